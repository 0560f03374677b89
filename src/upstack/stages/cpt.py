"""cpt stage: causal-LM training on plain text (pretraining from init, or continuing an upscaled model)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from upstack.training import TrainingSpec
from upstack.training import output_shape as output_shape  # the model's shape, kept
from upstack.training import preflight as preflight  # data sources checked before anything runs

LAUNCHABLE = True  # runs under `accelerate launch` when the recipe's launch block asks


class Spec(TrainingSpec):
    DATA_FORMAT: ClassVar[str] = "text"

    kind: Literal["cpt"] = "cpt"


def stage_defaults(flash_attention: bool) -> dict[str, Any]:
    """What cpt sets in SFTConfig before the recipe's `trainer:`.

    Packing: documents are short next to the context; padding them would waste most of each
    batch. bfd keeps documents whole and needs padding-free attention (flash-attn); without it
    transformers masks each document apart, 3x slower per step on CPU than `wrapped`, which
    concatenates and cuts: the classic pretraining layout.
    """
    if flash_attention:
        packing = {"packing_strategy": "bfd", "padding_free": True}
    else:
        packing = {"packing_strategy": "wrapped"}
    return {"packing": True, **packing, "dataset_text_field": "text"}


def build_trainer(spec: Spec, ctx):
    """SFTTrainer on a `text` column: plain next-token loss over every token."""
    from trl import SFTConfig, SFTTrainer

    from upstack import training

    inputs = training.prepare(spec, ctx)
    settings = training.trainer_settings(spec, stage_defaults)
    return SFTTrainer(
        args=training.trainer_config(SFTConfig, settings, ctx),
        train_dataset=inputs.train,
        eval_dataset=inputs.held_out,
        **training.model_parts(spec, ctx, inputs),
    )


def run(spec: Spec, ctx) -> dict:
    from upstack import training

    return training.train_and_save(build_trainer(spec, ctx), spec, ctx)
