"""cpt stage: causal-LM training on plain text (pretraining from init, or continuing an upscaled model)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from upstack.data import Source, source_refs
from upstack.recipe import StageSpec
from upstack.training import Adapter, check_datasets, check_trainer_keys

LAUNCHABLE = True  # runs under `accelerate launch` when the recipe's launch block asks


class Spec(StageSpec):
    kind: Literal["cpt"] = "cpt"
    model: str = Field(description="stage name, local path or Hub id of the model to train")
    datasets: list[Source] = Field(min_length=1, description="sources of a `text` column")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="held out for eval loss if no source has eval_split"
    )
    adapter: Adapter | None = None
    trainer: dict[str, Any] = Field(default_factory=dict, description="trl.SFTConfig fields")

    @field_validator("trainer")
    @classmethod
    def _trainer_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_trainer_keys(value, "SFTConfig")

    def refs(self) -> dict[str, str]:
        return {"model": self.model, **source_refs(self.datasets)}


preflight = check_datasets  # the runner's hook: data sources checked before anything is written


def build_trainer(spec: Spec, ctx):
    """SFTTrainer on a `text` column: plain next-token loss over every token."""
    from trl import SFTConfig, SFTTrainer

    from upstack import training
    from upstack.data import build_mixture

    model_path = ctx.model_path(spec.model)
    tokenizer = training.load_tokenizer(model_path, ctx)
    train, held_out = build_mixture(spec.datasets, "text", ctx, spec.eval_fraction)
    # Packing: documents are short next to the context; padding them would waste most of each batch.
    # bfd keeps documents whole and needs padding-free attention (flash-attn); without it
    # transformers masks each document apart, 3x slower per step on CPU than `wrapped`, which
    # concatenates and cuts: the classic pretraining layout.
    if training.flash_attention():
        packing = {"packing_strategy": "bfd", "padding_free": True}
    else:
        packing = {"packing_strategy": "wrapped"}
    config = training.trainer_config(
        SFTConfig, spec.trainer, ctx, packing=True, **packing, dataset_text_field="text"
    )
    return SFTTrainer(
        model=training.load_model(model_path, spec.adapter, ctx),
        args=config,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        peft_config=training.lora_config(spec.adapter),
        callbacks=[training.nan_guard(ctx)],
    )


def run(spec: Spec, ctx) -> dict:
    from upstack import training

    return training.train_and_save(build_trainer(spec, ctx), spec, ctx)
