"""Router statistics of a mixture of experts (upscale's moe) while cpt/sft/dpo train it: how the
tokens are spread over the experts of each layer. A router that sends everything to one expert
has collapsed into a dense model that costs k times as much; the load-balancing loss (TRL adds it
with the config's `router_aux_loss_coef`) is there to prevent that, and these counts show
whether it did."""

from __future__ import annotations

from typing import Any


def expert_count(config) -> int | None:
    """Experts per layer of a mixture, under the key its config class reads (Mixtral's
    num_local_experts, Qwen3-MoE's num_experts); None for a dense model."""
    return getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)


def is_moe(config) -> bool:
    """A config with experts per layer (Mixtral, Qwen3-MoE and their kin)."""
    return bool(expert_count(config))


def routers(model) -> list[tuple[int, Any]]:
    """(layer index, router module) of every MoE layer: transformers 5's Mixtral keeps it at
    `mlp.gate` (a TopKRouter returning logits, scores, indices), 4.x at `block_sparse_moe.gate`
    (a Linear returning logits)."""
    from upstack.models.layer_analysis import decoder_layers

    found = []
    for index, layer in enumerate(decoder_layers(model)):
        modules = dict(layer.named_modules())
        router = modules.get("mlp.gate") or modules.get("block_sparse_moe.gate")
        if router is not None:
            found.append((index, router))
    return found


def router_load(model):
    """A TrainerCallback that counts, per layer and expert, the tokens the router sends there
    (each token counts once for each of its top-k experts), apart for training and evaluation
    forwards. Hooks on the routers see every token of the batch, padding included; activation
    checkpointing runs a forward twice, which scales a layer's counts but not its fractions."""
    import torch
    from transformers import TrainerCallback

    config = model.config.get_text_config()
    experts, top_k = expert_count(config), config.num_experts_per_tok

    class RouterLoad(TrainerCallback):
        def __init__(self) -> None:
            self.layers = [index for index, _ in routers(model)]
            self.counts: dict[str, Any] = {}
            self.handles = [
                router.register_forward_hook(self._hook(row))
                for row, (_, router) in enumerate(routers(model))
            ]

        def _hook(self, row: int):
            def count(module, args, output) -> None:
                if isinstance(output, tuple):  # transformers 5: (logits, scores, indices)
                    chosen = output[2]
                else:  # a Linear gate: its logits, the top-k taken as the block takes them
                    chosen = torch.topk(output, top_k, dim=-1).indices
                mode = "train" if module.training else "eval"
                if mode not in self.counts:
                    self.counts[mode] = torch.zeros(
                        len(self.layers), experts, dtype=torch.long, device=chosen.device
                    )
                counts = self.counts[mode]
                counts[row] += torch.bincount(chosen.reshape(-1), minlength=experts).to(
                    counts.device
                )

            return count

        # the final evaluate() comes after train(), so the hooks stay until `load_metrics`
        def remove(self) -> None:
            for handle in self.handles:
                handle.remove()
            self.handles = []

    return RouterLoad()


def load_metrics(callback, accelerator=None) -> dict[str, Any]:
    """The manifest's `router_load`: per mode (train, eval) and layer, the fraction of routed
    token slots each expert got (a row sums to 1), and `imbalance`, the busiest expert's share
    times the number of experts (1.0: perfectly even; the number of experts: one expert takes
    everything)."""
    callback.remove()
    result: dict[str, Any] = {"layers": callback.layers}
    for mode, counts in sorted(callback.counts.items()):
        if accelerator is not None and accelerator.num_processes > 1:
            counts = accelerator.reduce(
                counts, reduction="sum"
            )  # every rank routed its own batches
        counts = counts.cpu().double()
        totals = counts.sum(dim=1, keepdim=True).clamp(min=1)
        fractions = counts / totals
        experts = counts.shape[1]
        result[mode] = {
            "assignments": int(counts.sum().item()),
            "fractions": [[round(v, 5) for v in row] for row in fractions.tolist()],
            "imbalance": [round(float(row.max()) * experts, 4) for row in fractions],
        }
    return result


def load_table(metrics: dict[str, Any], mode: str = "train") -> str:
    """The per-layer load as a markdown table, for the stage's log."""
    from upstack.core.tables import markdown_table

    found = metrics.get(mode)
    if not found:
        return f"no {mode} forward reached the routers"
    experts = len(found["fractions"][0]) if found["fractions"] else 0
    rows = [
        [str(layer), *(f"{f:.3f}" for f in row), f"{imbalance:.2f}"]
        for layer, row, imbalance in zip(
            metrics["layers"], found["fractions"], found["imbalance"], strict=True
        )
    ]
    headers = ["layer", *(f"expert {e}" for e in range(experts)), "max/even"]
    return markdown_table(headers, rows)
