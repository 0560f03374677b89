"""sft stage: supervised fine-tuning on conversations with TRL's SFTTrainer (full, LoRA or QLoRA)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from upstack.train.hooks import output_shape as output_shape  # the model's shape, kept
from upstack.train.hooks import preflight as preflight  # model, data, train_layers checked first
from upstack.train.spec import TrainingSpec

# The stage contract (upstack.core.contract)
OUTPUT = "model"  # a checkpoint
LAYER_MAP = "keeps"  # its model has its input's layers one for one
LAUNCHABLE = True  # runs under `accelerate launch` when the recipe's launch block asks


class Spec(TrainingSpec):
    DATA_FORMAT: ClassVar[str] = "sft"  # messages, or prompt/completion

    kind: Literal["sft"] = "sft"
    chat_template: str | None = Field(
        None, description="Jinja template (inline or a file); default: the tokenizer's"
    )


def stage_defaults(flash_attention: bool) -> dict[str, Any]:
    """What sft sets in SFTConfig before the recipe's `trainer:`; the loss mask
    (assistant_only_loss or completion_only_loss) follows from the chat template at run time."""
    return {"padding_free": True} if flash_attention else {}


def build_trainer(spec: Spec, ctx):
    """The SFTTrainer, data tokenized and masked, before any step: what `run` trains and tests inspect."""
    from trl import SFTConfig, SFTTrainer

    from upstack.train.inputs import prepare
    from upstack.train.model import model_parts
    from upstack.train.settings import trainer_config, trainer_settings

    inputs = prepare(spec, ctx, spec.chat_template)
    train, held_out = inputs.train, inputs.held_out
    if inputs.marks_turns:
        # the template's {% generation %} marks say which tokens are the assistant's
        loss_mask = {"assistant_only_loss": True}
    else:
        # No marks: loss on the last (assistant) turn only, as a prompt/completion pair.
        train, held_out = (_as_completion(d) if d is not None else None for d in (train, held_out))
        loss_mask = {"completion_only_loss": True}
    settings = {**trainer_settings(spec, stage_defaults, inputs), **loss_mask}
    return SFTTrainer(
        args=trainer_config(SFTConfig, settings, ctx),
        train_dataset=train,
        eval_dataset=held_out,
        **model_parts(spec, ctx, inputs),
    )


def card_tags(spec: Spec) -> list[str]:
    return ["sft", "trl"]


def effective_settings(spec: Spec) -> dict[str, Any]:
    """What this stage passes to TRL on this machine (`upstack show`)."""
    from upstack.train.settings import trainer_settings

    return trainer_settings(spec, stage_defaults)


def run(spec: Spec, ctx) -> dict:
    from upstack.train.loop import train_and_save

    return train_and_save(build_trainer(spec, ctx), spec, ctx)


def _as_completion(dataset):
    def split(row: dict) -> dict:
        return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}

    return dataset.map(split, remove_columns=["messages"])
