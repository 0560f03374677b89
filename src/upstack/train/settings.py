"""The TRL config a training stage runs with: upstack's defaults for this machine, then the
stage's, then the recipe's `trainer:`; and, for the manifest, the fields that differ from TRL's
own defaults."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from upstack.train.inputs import Inputs
from upstack.train.spec import TrainingSpec

# The stage's work dir subfolder the Trainer writes its checkpoints to (resume reads them there)
CHECKPOINTS = "checkpoints"
# rows from which tokenizing in worker processes pays for starting them
TOKENIZE_IN_PARALLEL = 50_000


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def flash_attention() -> bool:
    """On a GPU with flash-attn installed: sequences are concatenated without padding (padding_free)."""
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def upstack_defaults(on_gpu: bool) -> dict[str, Any]:
    """What upstack sets in every TRL config before the stage's defaults and the recipe's
    `trainer:` block (both win over these), as TRL documents its own departures from
    TrainingArguments."""
    import importlib.util

    return {
        "bf16": on_gpu,  # on a GPU without bf16 (pre-Ampere) the recipe sets fp16 instead
        "fp16": False,
        # recomputing activations saves GPU memory on big models; on CPU it only costs time
        "activation_checkpointing": on_gpu,
        "use_cpu": not on_gpu,
        "use_liger_kernel": on_gpu and importlib.util.find_spec("liger_kernel") is not None,
        "report_to": "none",
        "logging_steps": 10,
        "logging_first_step": True,
        "logging_nan_inf_filter": False,  # the NaN guard must see a NaN loss, not an average without it
        "include_num_input_tokens_seen": "non_padding",
        "save_steps": 500,
        "save_total_limit": 2,  # checkpoints are big; resume needs only the last complete one
    }


def trainer_settings(
    spec: TrainingSpec,
    stage_defaults: Callable[[bool], dict[str, Any]],
    inputs: Inputs | None = None,
) -> dict[str, Any]:
    """Every setting the TRL config gets but output_dir and seed, on this machine: upstack's
    defaults, then the stage's (`stage_defaults(flash_attention)`), then the recipe's `trainer:`.
    With the data in hand, a large data set is tokenized by several worker processes."""
    gpu = on_gpu()
    defaults = upstack_defaults(gpu)
    if inputs is not None and len(inputs.train) >= TOKENIZE_IN_PARALLEL:
        defaults["dataset_num_proc"] = min(8, len(os.sched_getaffinity(0)))
    if spec.trainer.get("fp16"):
        defaults["bf16"] = False
    if gpu:
        import torch

        defaults["bf16"] = defaults["bf16"] and torch.cuda.is_bf16_supported()
    return {**defaults, **stage_defaults(flash_attention()), **spec.trainer}


def trainer_config(config_cls: type, settings: dict[str, Any], ctx):
    """The TRL config from `trainer_settings`, with the checkpoints in the stage's work dir."""
    trackers_write_here(ctx)
    try:
        return config_cls(**settings, output_dir=str(ctx.work_dir / CHECKPOINTS), seed=ctx.seed)
    except (TypeError, ValueError) as err:
        raise ctx.fail("trainer", str(err).strip().splitlines()[0]) from None


# Where trackers write their local files unless the user says (their variables), so upstack writes
# nothing outside the output dir: tensorboard's events into the stage dir (kept with the model),
# wandb's and mlflow's local runs into the stage's work dir.
_SET_BY_UPSTACK: dict[str, str] = {}


def trackers_write_here(ctx) -> None:
    places = {
        "TENSORBOARD_LOGGING_DIR": str(ctx.out_dir / "logs"),
        "WANDB_DIR": str(ctx.work_dir),
        "MLFLOW_TRACKING_URI": f"file:{ctx.work_dir / 'mlruns'}",
        "TRACKIO_DIR": str(ctx.work_dir / "trackio"),
    }
    for variable, place in places.items():
        if variable not in os.environ or os.environ[variable] == _SET_BY_UPSTACK.get(variable):
            os.environ[variable] = _SET_BY_UPSTACK[variable] = place


def changed_fields(config) -> dict[str, Any]:
    """The fields of a TRL config whose value differs from the class's declared default, as
    plain values (where checkpoints go is the work dir's business, not a setting)."""
    import dataclasses

    values = config.to_dict()
    changed = {}
    for field in dataclasses.fields(config):
        if (
            not field.init
            or field.name in ("output_dir", "logging_dir")
            or field.name not in values
        ):
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        if values[field.name] != getattr(default, "value", default):  # enums compare by value
            changed[field.name] = values[field.name]
    return changed


def loading(spec: TrainingSpec) -> dict[str, Any]:
    """from_pretrained's arguments the stage's settings give: revision, dtype, attention."""
    kwargs: dict[str, Any] = {}
    if spec.revision is not None:
        kwargs["revision"] = spec.revision
    if spec.dtype != "auto":
        kwargs["dtype"] = spec.dtype
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    elif flash_attention():
        kwargs["attn_implementation"] = "flash_attention_2"  # what padding-free batches need
    return kwargs
