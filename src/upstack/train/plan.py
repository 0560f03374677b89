"""What a training stage (cpt, sft, dpo) will need before it runs: the stage contract's `plan`
hook. From the model's planned shape (upstack.models.shapes), what trains (`train_layers`, the
adapter), the settings TRL will get on a GPU (upstack's defaults, the stage's, the recipe's
`trainer:`), and the machine the plan is for (ctx.machine: GPUs, launch, MFU, price), it counts
parameters, memory per GPU by component (upstack.models.memory), tokens, time, GPU-hours and
cost. Nothing is loaded and torch is not imported.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upstack.models import layermap
from upstack.models.memory import (
    GIB,
    Architecture,
    Batch,
    Memory,
    Precision,
    Strategy,
    Trained,
    memory,
    parameters,
    reference_flops_per_token,
    train_flops_per_token,
)
from upstack.train.spec import TrainingSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Setup:
    """What the memory model needs of a stage: the model, what of it trains, one micro-batch,
    the precision, and whether DPO keeps a second model for its reference."""

    arch: Architecture
    trained: Trained
    batch: Batch
    precision: Precision
    reference_copy: bool = False
    notes: list[str] = field(default_factory=list)


def gpu_settings(spec: TrainingSpec, stage_defaults: Callable[[bool], dict]) -> dict[str, Any]:
    """What the stage's TRL config would hold on a GPU machine with this environment's packages
    (Liger, flash-attn where installed here): TRL's declared defaults, upstack's, the stage's,
    then the recipe's `trainer:` (upstack.train.settings.trainer_settings, for a GPU)."""
    from upstack.train.settings import upstack_defaults
    from upstack.train.trl_fields import trainer_defaults

    flash = importlib.util.find_spec("flash_attn") is not None
    settings = {
        **trainer_defaults(spec.TRAINER_CONFIG),
        **upstack_defaults(True),
        **stage_defaults(flash),
        **spec.trainer,
    }
    if spec.trainer.get("fp16"):
        settings["bf16"] = False
    settings["flash_attention"] = flash or (spec.attn_implementation or "").startswith("flash")
    return settings


def setup(
    spec: TrainingSpec, settings: dict[str, Any], shape: dict, ctx, device: str = "cuda"
) -> Setup | None:
    """The memory model's inputs for a stage with these TRL settings, on a model of `shape`
    (None when the shape is not known). The micro-batch is the worst the settings allow: every
    row `max_length` tokens (padded to the longest row, one long row hits it)."""
    arch = Architecture.from_shape(shape)
    if arch is None:
        return None
    notes: list[str] = []
    trained = trained_of(spec, arch, ctx, notes)
    preference = spec.DATA_FORMAT == "preference"
    rows = int(settings.get("per_device_train_batch_size") or 8)
    length = int(settings.get("max_length") or 1024)
    flash = bool(settings.get("flash_attention"))
    packed = bool(settings.get("packing")) and not preference
    padding_free = bool(settings.get("padding_free")) or (
        packed and settings.get("packing_strategy", "bfd") == "bfd" and flash
    )
    if padding_free:
        # one row of every sequence back to back (without flash-attn each document masked apart)
        batch_rows, batch_length = 1, rows * length * (2 if preference else 1)
    else:
        batch_rows, batch_length = rows * (2 if preference else 1), length
    # without flash-attn, TRL's packed rows keep their documents apart with a mask (wrapped too:
    # position ids restart at each document) and padded rows carry one: sdpa takes it
    masked = not flash
    checkpointing = settings.get("activation_checkpointing")
    if checkpointing is None:
        checkpointing = settings.get("gradient_checkpointing", False)
    batch = Batch(
        rows=batch_rows,
        length=batch_length,
        masked=masked,
        checkpointing=bool(checkpointing),
        liger=bool(settings.get("use_liger_kernel")),
        accumulation=int(settings.get("gradient_accumulation_steps") or 1),
    )
    dtype = spec.dtype if spec.dtype != "auto" else shape.get("dtype") or shape.get("torch_dtype")
    weight_bytes = DTYPE_BYTES.get(str(dtype).removeprefix("torch."))
    if weight_bytes is None:
        weight_bytes = 4
        notes.append("the checkpoint's dtype is not known before it is written: fp32 counted")
    mixed = bool(settings.get("bf16") or settings.get("fp16")) and device == "cuda"
    precision = Precision(weight_bytes=weight_bytes, mixed=mixed, device=device)
    inline_reference = preference and not settings.get("precompute_ref_log_probs")
    return Setup(
        arch,
        trained,
        batch,
        precision,
        reference_copy=inline_reference and spec.adapter is None,
        notes=notes,
    )


def trained_of(spec: TrainingSpec, arch: Architecture, ctx, notes: list[str]) -> Trained:
    """What trains, as upstack.train.trainable.resolve decides it when the model is loaded."""
    layers = layermap.train_layers(spec.train_layers, ctx, arch.layers)
    if layers is None:
        layers = list(range(arch.layers))
        notes.append(
            f"train_layers {spec.train_layers}: the layer map is known only when the stage "
            "starts; every layer counted"
        )
    everything = spec.train_layers == "all" and spec.adapter is None
    within = layermap.WITHIN.get(spec.train_layers) if isinstance(spec.train_layers, str) else None
    adapter = spec.adapter
    return Trained(
        layers=tuple(layers),
        embeddings=everything if spec.train_embeddings is None else spec.train_embeddings,
        lm_head=everything if spec.train_lm_head is None else spec.train_lm_head,
        final_norm=everything,
        within=within,
        adapter=adapter.type if adapter else None,
        rank=adapter.r if adapter else 16,
        targets=(
            "all-linear"
            if adapter is None or adapter.target_modules == "all-linear"
            else tuple(adapter.target_modules)
        ),
        dropout=adapter.dropout if adapter else 0.0,
    )


def known_rows(spec: TrainingSpec, ctx) -> tuple[int | None, int | None]:
    """Training rows the data sets give, when known before the run (generated data, local JSON
    Lines files, `max_samples`), and for cpt the tokens its sources are cut to (`max_tokens`);
    None where a source's size is not known offline (a Hub data set without max_samples)."""
    rows, tokens = 0, 0
    rows_known, tokens_known = True, True
    for source in spec.datasets:
        count = None
        if source.arith is not None:
            count = source.arith.problems
        elif source.generated is not None:
            count = source.generated.problems
        elif source.path is not None:
            count = _lines(Path(source.path), ctx)
        if source.max_samples is not None:
            count = source.max_samples if count is None else min(count, source.max_samples)
        if count is None:
            rows_known = False
        else:
            rows += int(count * source.weight)
        if source.max_tokens is None:
            tokens_known = False
        else:
            tokens += source.max_tokens
    mixture = getattr(spec, "mixture", None)
    if mixture is not None and mixture.rows is not None:
        rows, rows_known = mixture.rows, True
    held_out = 1 - spec.eval_fraction if not any(s.eval_split for s in spec.datasets) else 1
    return (int(rows * held_out) if rows_known else None), (tokens if tokens_known else None)


def _lines(path: Path, ctx) -> int | None:
    """Rows of a local JSON Lines file (relative to where the run starts, as the stage reads it)."""
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return None
    with path.open("rb") as file:
        return sum(1 for line in file if line.strip())


def plan(spec: TrainingSpec, ctx, stage_defaults: Callable[[bool], dict]) -> dict | None:
    """The `plan` hook of cpt, sft and dpo (see the module's docstring). None without a machine."""
    from upstack.models.shapes import plan_shape

    machine = ctx.machine
    if machine is None:
        return None
    shape = plan_shape(ctx.recipe, ctx.ref("model"), ctx.pending)
    settings = gpu_settings(spec, stage_defaults)
    found = setup(spec, settings, shape or {}, ctx)
    out: dict[str, Any] = {"stage": ctx.name, "kind": spec.kind}
    if found is None:
        return {
            **out,
            "known": False,
            "notes": [
                f"the shape of {ctx.ref('model').text} is not known offline: download its "
                "config.json (huggingface-cli download MODEL config.json) or run the stage "
                "that makes it"
            ],
        }
    gpus, strategy = machine.gpus, machine.strategy
    counted = memory(
        found.arch,
        found.trained,
        found.batch,
        found.precision,
        Strategy.of(strategy),
        reference_copy=found.reference_copy,
    )
    counts = parameters(found.arch, found.trained)
    need = counted.total / GIB
    out.update(
        known=True,
        parameters=counts.total,
        trainable=counts.trainable,
        trains=_trains(spec, found.trained, found.arch),
        launch=strategy.describe(),
        world=strategy.world,
        micro_batch={
            "rows": found.batch.rows,
            "length": found.batch.length,
            "accumulation": found.batch.accumulation,
            "activation_checkpointing": found.batch.checkpointing,
            "attention_mask": found.batch.masked,
            "liger_kernels": found.batch.liger,
            "bytes_per_activation": found.precision.activation_bytes,
            "bytes_per_weight": found.precision.weight_bytes,
        },
        components_gb={k: round(c.gib, 3) for k, c in counted.components().items()},
        formulas={k: c.formula for k, c in counted.components().items()},
        gradients_held=counted.gradients_held,
        memory_per_gpu_gb=round(need, 3),
        host_gb=round(counted.host / GIB, 3),
        gpu_memory_gb=gpus.memory_gib,
        fits=need <= gpus.memory_gib,
        headroom_gb=round(gpus.memory_gib - need, 3),
        largest=counted.largest(),
        notes=list(found.notes),
    )
    out.update(compute(spec, ctx, settings, found, strategy.world, machine))
    return out


def memory_of(found: Setup, strategy: Strategy) -> Memory:
    return memory(
        found.arch, found.trained, found.batch, found.precision, strategy, found.reference_copy
    )


def compute(spec: TrainingSpec, ctx, settings: dict, found: Setup, world: int, machine) -> dict:
    """Steps, tokens, FLOPs, time at the machine's MFU, GPU-hours and cost."""
    preference = spec.DATA_FORMAT == "preference"
    rows_per_step = int(settings.get("per_device_train_batch_size") or 8) * found.batch.accumulation
    rows_per_step *= world
    length = int(settings.get("max_length") or 1024)
    epochs = float(settings.get("num_train_epochs") or 1)
    max_steps = int(settings.get("max_steps") or -1)
    rows, tokens_cut = known_rows(spec, ctx)
    packed_text = spec.DATA_FORMAT == "text" and settings.get("packing")
    steps, exact = None, bool(packed_text)
    if max_steps > 0:
        steps = max_steps
    elif packed_text and tokens_cut is not None:
        steps = math.ceil(epochs * math.ceil(tokens_cut / (length * rows_per_step)))
    elif rows is not None and not packed_text:
        steps = math.ceil(epochs * math.ceil(rows / rows_per_step))
    out: dict[str, Any] = {"rows": rows, "steps": steps}
    if steps is None:
        out["notes_compute"] = (
            "rows unknown before the run (a Hub data set: set max_samples, or max_steps)"
        )
        return out
    sequences = steps * rows_per_step * (2 if preference else 1)
    tokens = sequences * length
    per_token = train_flops_per_token(found.arch, found.trained, length)
    if preference:
        per_token += reference_flops_per_token(found.arch, length)
    flops = tokens * per_token
    out.update(
        tokens=tokens,
        tokens_exact=exact,
        flops_per_token=per_token,
        flops=flops,
    )
    if machine.gpus.tflops:
        seconds = flops / (world * machine.gpus.tflops * 1e12 * machine.mfu)
        out.update(hours=seconds / 3600, gpu_hours=seconds / 3600 * world)
        if machine.price is not None:
            out["cost"] = out["gpu_hours"] * machine.price
    return out


def _trains(spec: TrainingSpec, trained: Trained, arch: Architecture) -> str:
    if trained.adapter:
        what = f"{trained.adapter} r={trained.rank}"
    elif len(trained.layers) == arch.layers and trained.embeddings and trained.lm_head:
        return "all"
    else:
        what = "full"
    if len(trained.layers) != arch.layers:
        what += f", layers {_spans(trained.layers)}"
    return what


def _spans(layers: tuple[int, ...]) -> str:
    spans: list[list[int]] = []
    for index in layers:
        if spans and spans[-1][1] + 1 == index:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
