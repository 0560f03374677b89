"""Which parameters a training stage trains (`train_layers`, `train_embeddings`, `train_lm_head`):
the rest is frozen before the optimizer is built, so it gets no gradient and no optimizer state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from upstack.models import layermap


@dataclass(frozen=True)
class Trainable:
    """What trains, resolved for one model."""

    layers: tuple[int, ...]  # decoder layer indices
    embeddings: bool
    lm_head: bool
    rest: bool  # the final norm (and anything else outside layers, embeddings, head)
    within: str | None = None  # only this module of each trained layer trains ("mlp": experts)

    def record(self, selection: str | list[int]) -> dict[str, Any]:
        return {
            "train_layers": selection,
            "layers": list(self.layers),
            "within_layers": self.within or "all",
            "embeddings": self.embeddings,
            "lm_head": self.lm_head,
            "final_norm": self.rest,
        }


def resolve(spec, ctx, num_layers: int) -> Trainable:
    """The parameters `spec` trains on a model of `num_layers` layers. Embeddings and head
    follow `train_layers` unless set: trained with `all` (as ever), frozen otherwise (LLaMA Pro
    freezes everything but the new blocks); with an adapter, frozen unless set (LoRA's way)."""
    layers = layermap.train_layers(spec.train_layers, ctx, num_layers)
    everything = spec.train_layers == "all" and spec.adapter is None
    within = layermap.WITHIN.get(spec.train_layers) if isinstance(spec.train_layers, str) else None
    return Trainable(
        layers=tuple(layers),
        embeddings=everything if spec.train_embeddings is None else spec.train_embeddings,
        lm_head=everything if spec.train_lm_head is None else spec.train_lm_head,
        rest=everything,
        within=within,
    )


def parts(model, within: str | None = None) -> dict[str, Any]:
    """Parameter name -> the part it belongs to: a layer index, "embeddings", "lm_head" or
    "rest". Tied embeddings (one tensor for both) are listed once, as "embeddings". With
    `within`, a layer's parameters outside that module of it belong to ("outside", index)."""
    from upstack.models.layer_analysis import decoder_layers

    owner: dict[int, Any] = {}
    for index, layer in enumerate(decoder_layers(model)):
        for name, param in layer.named_parameters():
            inside = within is None or name.startswith(f"{within}.")
            owner[id(param)] = index if inside else ("outside", index)
    head = model.get_output_embeddings()
    for param in head.parameters() if head is not None else ():
        owner[id(param)] = "lm_head"
    for param in model.get_input_embeddings().parameters():
        owner[id(param)] = "embeddings"
    return {name: owner.get(id(param), "rest") for name, param in model.named_parameters()}


def is_tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def trains(trainable: Trainable, part: Any) -> bool:
    if isinstance(part, int):
        return part in trainable.layers
    if isinstance(part, tuple):  # a layer's parameter outside the module `within` trains
        return False
    return {"embeddings": trainable.embeddings, "lm_head": trainable.lm_head}.get(
        part, trainable.rest
    )


def freeze(model, trainable: Trainable) -> None:
    """Full training: every parameter outside `trainable` stops requiring a gradient, so the
    Trainer's optimizer (built from parameters that require one) never holds state for it."""
    named = dict(model.named_parameters())
    for name, part in parts(model, trainable.within).items():
        named[name].requires_grad_(trains(trainable, part))


def lora_targets(model, trainable: Trainable, target_modules: list[str] | str) -> list[str]:
    """The full names of the Linear modules of the trained layers that `target_modules`
    ("all-linear" or module names) picks: peft's `layers_to_transform` refuses "all-linear"."""
    import torch

    from upstack.models.layer_analysis import decoder_layers

    stack = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is stack)
    found = []
    for index in trainable.layers:
        for name, module in stack[index].named_modules():
            if not isinstance(module, torch.nn.Linear):  # bitsandbytes' Linear4bit is one too
                continue
            if trainable.within and not name.startswith(f"{trainable.within}."):
                continue
            if target_modules == "all-linear" or any(
                name == t or name.endswith(f".{t}") for t in target_modules
            ):
                found.append(f"{prefix}.{index}.{name}")
    return found


# What peft (with transformers 5) adapts as parameters (lora.ParamWrapper) in a mixture of experts:
# the fused experts and the routers, which it reaches when the targets are all-linear or name
# them as transformers 4 did (w1/w2/w3, gate_proj/up_proj/down_proj, the router `gate`).
PARAMETER_TARGETS = ("gate", "w1", "w2", "w3", "gate_proj", "up_proj", "down_proj")


def adapter_dropout_problem(spec, mixture: bool) -> str | None:
    """Why the adapter cannot train this model as set: peft refuses lora_dropout != 0 for a
    parameter adapter (dropout of the input cannot be factored out of a fused expert), and the
    Adapter's default is 0.05, so LoRA on a mixture's experts needs `dropout: 0`. Only when
    every layer trains: with a layer subset, LoRA targets are the trained layers' Linear modules,
    which take dropout."""
    adapter = spec.adapter
    if adapter is None or not adapter.dropout or not mixture or spec.train_layers != "all":
        return None
    targets = adapter.target_modules
    if targets != "all-linear" and not any(t in PARAMETER_TARGETS for t in targets):
        return None
    return (
        f"{adapter.dropout} does not work on a mixture of experts: peft adapts its experts and "
        "routers as parameters (lora.ParamWrapper), which take no dropout; set dropout: 0 (or "
        "target the attention only, e.g. target_modules: [q_proj, k_proj, v_proj, o_proj])"
    )


def modules_to_save(model, trainable: Trainable) -> list[str]:
    """With an adapter, embeddings or head set to train are trained in full (peft's
    modules_to_save), since a low-rank update of a vocabulary matrix is rarely what one wants."""
    names = {id(module): name for name, module in model.named_modules()}
    wanted = []
    if trainable.embeddings:
        wanted.append(names[id(model.get_input_embeddings())])
    if trainable.lm_head and model.get_output_embeddings() is not None:
        wanted.append(names[id(model.get_output_embeddings())])
    return list(dict.fromkeys(wanted))


def counted(trainer) -> dict[str, Any]:
    """What training actually held, counted after the fact: parameters that required a gradient,
    and the parameters and bytes the optimizer kept state for (None where a wrapper hides it)."""
    import torch

    def size(param) -> int:
        return getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 partitions params

    params = list(trainer.model.parameters())
    counts: dict[str, Any] = {
        "parameters": sum(size(p) for p in params),
        "parameters_trainable": sum(size(p) for p in params if p.requires_grad),
    }
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state = getattr(optimizer, "state", None)
    if isinstance(state, dict):
        by_id = {id(p): p for p in params}
        tensors = [t for s in state.values() for t in s.values() if torch.is_tensor(t)]
        counts["optimizer_state_parameters"] = sum(
            size(by_id[id(p)]) for p in state if id(p) in by_id
        )
        counts["optimizer_state_mb"] = round(
            sum(t.numel() * t.element_size() for t in tensors) / 2**20, 2
        )
    return counts
