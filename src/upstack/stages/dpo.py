"""dpo stage: preference tuning on prompt/chosen/rejected with TRL's DPOTrainer (full, LoRA or QLoRA)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from upstack.train.hooks import check_at_load as check_at_load  # a revision only on the Hub
from upstack.train.hooks import output_shape as output_shape  # the model's shape, kept
from upstack.train.hooks import preflight as preflight  # model, data, train_layers checked first
from upstack.train.spec import ChatSpec

# The stage contract (upstack.core.contract)
OUTPUT = "model"  # a checkpoint
LAYER_MAP = "keeps"  # its model has its input's layers one for one
LAUNCHABLE = True  # runs under `accelerate launch` when the recipe's launch block asks


class Spec(ChatSpec):
    TRAINER_CONFIG: ClassVar[str] = "DPOConfig"  # beta, loss_type, learning_rate, ...
    DATA_FORMAT: ClassVar[str] = "preference"  # prompt/chosen/rejected

    kind: Literal["dpo"] = "dpo"


def stage_defaults(flash_attention: bool) -> dict[str, Any]:
    """What dpo sets in DPOConfig before the recipe's `trainer:`: the reference's log-probs are
    computed once up front, so no second model stays in memory during training."""
    return {"precompute_ref_log_probs": True, **({"padding_free": True} if flash_attention else {})}


def build_trainer(spec: Spec, ctx):
    """The DPOTrainer before any step. The reference is the policy as loaded: with an adapter,
    the same model with the adapter disabled (ref_model=None); for full training its log-probs
    are computed once up front, so no second model stays in memory either way."""
    from trl import DPOConfig, DPOTrainer

    from upstack.train.inputs import prepare
    from upstack.train.model import model_parts
    from upstack.train.settings import trainer_config, trainer_settings

    inputs = prepare(spec, ctx, spec.chat_template)
    settings = trainer_settings(spec, stage_defaults, inputs)
    return DPOTrainer(
        ref_model=None,
        args=trainer_config(DPOConfig, settings, ctx),
        train_dataset=inputs.train,
        eval_dataset=inputs.held_out,
        **model_parts(spec, ctx, inputs),
    )


def card_tags(spec: Spec) -> list[str]:
    return ["dpo", "trl"]


def plan(spec: Spec, ctx) -> dict | None:
    """What the stage will need on the machine `ctx.machine`: memory per GPU, tokens, time
    (upstack.train.plan)."""
    from upstack.train.plan import plan as training_plan

    return training_plan(spec, ctx, stage_defaults)


def effective_settings(spec: Spec) -> dict[str, Any]:
    """What this stage passes to TRL on this machine (`upstack show`)."""
    from upstack.train.settings import trainer_settings

    return trainer_settings(spec, stage_defaults)


def run(spec: Spec, ctx) -> dict:
    from upstack.train.loop import train_and_save

    return train_and_save(build_trainer(spec, ctx), spec, ctx)
