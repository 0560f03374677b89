"""Expert usage of a PEER model (upscale's peer) while cpt/sft/dpo train it: which of each PEER
layer's N experts the product keys retrieve. PEER's gain is the many experts; a layer that keeps
retrieving the same few is a small dense FFN with extra steps, and the paper's query batch norm
is there to prevent that. These counts show whether it did: per layer, the fraction of experts
retrieved at least once and the entropy of the retrievals, for the training steps and for the
held-out evaluation apart."""

from __future__ import annotations

import math
from typing import Any


def peer_layers(model) -> list[tuple[int, Any]]:
    """(layer index, PEER module) of every layer with a PEER branch (`mlp.peer`)."""
    from upstack.models.layer_analysis import decoder_layers

    found = []
    for index, layer in enumerate(decoder_layers(model)):
        branch = getattr(getattr(layer, "mlp", None), "peer", None)
        if branch is not None:
            found.append((index, branch))
    return found


def expert_usage(model):
    """A TrainerCallback that counts, per PEER layer and expert, the times a head retrieved it
    (each token counts h k times), apart for training and evaluation forwards. Padding tokens
    count too, as in a mixture's router load."""
    import torch
    from transformers import TrainerCallback

    class ExpertUsage(TrainerCallback):
        def __init__(self) -> None:
            found = peer_layers(model)
            self.layers = [index for index, _ in found]
            self.experts = found[0][1].experts if found else 0
            self.counts: dict[str, Any] = {}
            self.modules = [module for _, module in found]
            for row, module in enumerate(self.modules):
                module.on_retrieval = self._counter(row)

        def _counter(self, row: int):
            def count(module, experts) -> None:
                mode = "train" if module.training else "eval"
                if mode not in self.counts:
                    self.counts[mode] = torch.zeros(
                        len(self.layers), self.experts, dtype=torch.long, device=experts.device
                    )
                flat = experts.reshape(-1)
                counts = self.counts[mode]
                counts[row].index_add_(0, flat.to(counts.device), torch.ones_like(flat))

            return count

        def on_train_end(self, args, state, control, **kwargs):
            # `eval` is the final held-out evaluation, of the trained model: the evaluations
            # during training (every eval step) saw earlier weights
            self.counts.pop("eval", None)

        # the final evaluate() comes after train(), so the counters stay until `usage_metrics`
        def remove(self) -> None:
            for module in self.modules:
                module.on_retrieval = None
            self.modules = []

    return ExpertUsage()


def usage_metrics(callback, accelerator=None) -> dict[str, Any]:
    """The manifest's `expert_usage`: per mode (train, eval) and PEER layer, `used`, the fraction
    of the N experts retrieved at least once; `entropy`, of the retrieval frequencies in nats,
    and `entropy_ratio`, that over ln N (1.0: every expert alike; 0: one expert only); and
    `retrievals`, the count behind them (with fewer retrievals than experts, `used` cannot
    reach 1)."""
    callback.remove()
    result: dict[str, Any] = {"layers": callback.layers, "experts": callback.experts}
    for mode, counts in sorted(callback.counts.items()):
        if accelerator is not None and accelerator.num_processes > 1:
            counts = accelerator.reduce(counts, reduction="sum")  # every rank its own batches
        counts = counts.cpu().double()
        totals = counts.sum(dim=1)
        shares = counts / totals.clamp(min=1).unsqueeze(1)
        entropy = -(shares * shares.clamp(min=1e-300).log()).sum(dim=1)
        result[mode] = {
            "retrievals": [int(t) for t in totals.tolist()],
            "used": [round(float(u), 5) for u in (counts > 0).double().mean(dim=1)],
            "entropy": [round(float(e), 4) for e in entropy],
            "entropy_ratio": [round(float(e) / math.log(callback.experts), 4) for e in entropy],
        }
    return result


def usage_table(metrics: dict[str, Any], mode: str = "eval") -> str:
    """The per-layer usage as a markdown table, for the stage's log."""
    from upstack.core.tables import markdown_table

    found = metrics.get(mode)
    if not found:
        return f"no {mode} forward reached the PEER layers"
    rows = [
        [str(layer), str(n), f"{used:.3f}", f"{entropy:.2f}", f"{ratio:.3f}"]
        for layer, n, used, entropy, ratio in zip(
            metrics["layers"],
            found["retrievals"],
            found["used"],
            found["entropy"],
            found["entropy_ratio"],
            strict=True,
        )
    ]
    headers = ["layer", "retrievals", "experts used", "entropy (nats)", "entropy / ln N"]
    return markdown_table(headers, rows)
