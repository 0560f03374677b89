"""dpo stage: preference tuning on prompt/chosen/rejected with TRL's DPOTrainer (full, LoRA or QLoRA)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from upstack.data import Source, source_refs
from upstack.recipe import StageSpec
from upstack.training import Adapter, check_datasets, check_trainer_keys

LAUNCHABLE = True  # runs under `accelerate launch` when the recipe's launch block asks


class Spec(StageSpec):
    kind: Literal["dpo"] = "dpo"
    model: str = Field(
        description="stage name, local path or Hub id of the policy (and reference) model"
    )
    datasets: list[Source] = Field(min_length=1, description="sources of prompt/chosen/rejected")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="held out for eval loss if no source has eval_split"
    )
    chat_template: str | None = Field(
        None, description="Jinja template (inline or a file); default: the tokenizer's"
    )
    adapter: Adapter | None = None
    trainer: dict[str, Any] = Field(
        default_factory=dict,
        description="trl.DPOConfig fields: beta, loss_type, learning_rate, ...",
    )

    @field_validator("trainer")
    @classmethod
    def _trainer_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_trainer_keys(value, "DPOConfig")

    def refs(self) -> dict[str, str]:
        return {"model": self.model, **source_refs(self.datasets)}


preflight = check_datasets  # the runner's hook: data sources checked before anything is written


def build_trainer(spec: Spec, ctx):
    """The DPOTrainer before any step. The reference is the policy as loaded: with an adapter,
    the same model with the adapter disabled (ref_model=None); for full training its log-probs
    are computed once up front, so no second model stays in memory either way."""
    from trl import DPOConfig, DPOTrainer

    from upstack import training
    from upstack.data import build_mixture

    model_path = ctx.model_path(spec.model)
    tokenizer = training.load_tokenizer(model_path, ctx, spec.chat_template)
    training.require_chat_template(tokenizer, ctx, model_path)
    train, held_out = build_mixture(spec.datasets, "preference", ctx, spec.eval_fraction)
    fast = {"padding_free": True} if training.flash_attention() else {}
    config = training.trainer_config(
        DPOConfig, spec.trainer, ctx, **fast, precompute_ref_log_probs=True
    )
    return DPOTrainer(
        model=training.load_model(model_path, spec.adapter, ctx),
        ref_model=None,
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
