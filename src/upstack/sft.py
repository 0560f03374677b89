"""sft stage: supervised fine-tuning on conversations with TRL's SFTTrainer (full, LoRA or QLoRA)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from upstack.data import Source, source_refs
from upstack.recipe import StageSpec
from upstack.training import Adapter, check_datasets, check_trainer_keys

LAUNCHABLE = True  # runs under `accelerate launch` when the recipe's launch block asks


class Spec(StageSpec):
    kind: Literal["sft"] = "sft"
    model: str = Field(description="stage name, local path or Hub id of the model to fine-tune")
    datasets: list[Source] = Field(
        min_length=1, description="sources of `messages` or prompt/completion"
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="held out for eval loss if no source has eval_split"
    )
    chat_template: str | None = Field(
        None, description="Jinja template (inline or a file); default: the tokenizer's"
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
    """The SFTTrainer, data tokenized and masked, before any step: what `run` trains and tests inspect."""
    from trl import SFTConfig, SFTTrainer

    from upstack import training
    from upstack.data import build_mixture

    model_path = ctx.model_path(spec.model)
    tokenizer = training.load_tokenizer(model_path, ctx, spec.chat_template)
    marks_turns = training.require_chat_template(tokenizer, ctx, model_path)
    train, held_out = build_mixture(spec.datasets, "sft", ctx, spec.eval_fraction)
    if marks_turns:
        # the template's {% generation %} marks say which tokens are the assistant's
        loss_mask = {"assistant_only_loss": True}
    else:
        # No marks: loss on the last (assistant) turn only, as a prompt/completion pair.
        train, held_out = (_as_completion(d) if d is not None else None for d in (train, held_out))
        loss_mask = {"completion_only_loss": True}
    fast = {"padding_free": True} if training.flash_attention() else {}
    config = training.trainer_config(SFTConfig, spec.trainer, ctx, **fast, **loss_mask)
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


def _as_completion(dataset):
    def split(row: dict) -> dict:
        return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}

    return dataset.map(split, remove_columns=["messages"])
