"""sft stage: supervised fine-tuning on conversations with TRL's SFTTrainer (full, LoRA or QLoRA)."""

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
    DATA_FORMAT: ClassVar[str] = "sft"  # messages, or prompt/completion

    kind: Literal["sft"] = "sft"


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
        # No marks (zephyr's, SmolLM2's templates): every assistant turn found by rendering,
        # tokenized here with its mask (TRL builds the labels from it)
        train, held_out = (
            tokenized(d, inputs.tokenizer, ctx) if d is not None else None
            for d in (train, held_out)
        )
        loss_mask = {}
    settings = {**trainer_settings(spec, stage_defaults, inputs), **loss_mask}
    return SFTTrainer(
        args=trainer_config(SFTConfig, settings, ctx),
        train_dataset=train,
        eval_dataset=held_out,
        **model_parts(spec, ctx, inputs),
    )


def card_tags(spec: Spec) -> list[str]:
    return ["sft", "trl"]


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

    trainer = build_trainer(spec, ctx)
    trained = loss_tokens(trainer.train_dataset)
    ctx.log(
        f"loss on {trained['loss_tokens_per_example']:.1f} of "
        f"{trained['tokens_per_example']:.1f} tokens per example ({trained['mask']})"
    )
    return {**train_and_save(trainer, spec, ctx), "loss_mask": trained}


def loss_tokens(dataset, sample: int = 1000) -> dict:
    """How many tokens of an example the loss covers (labels not -100), against its length, on
    up to `sample` examples: what the mask does, in the manifest."""
    rows = dataset.select(range(min(sample, len(dataset))))
    labels = rows["labels"] if "labels" in rows.column_names else rows["input_ids"]
    trained = [sum(1 for label in row if label != -100) for row in labels]
    lengths = [len(row) for row in rows["input_ids"]]
    return {
        "mask": "assistant turns" if "labels" in rows.column_names else "every token",
        "loss_tokens_per_example": round(sum(trained) / max(len(trained), 1), 2),
        "tokens_per_example": round(sum(lengths) / max(len(lengths), 1), 2),
        "examples_counted": len(trained),
    }


def tokenized(dataset, tokenizer, ctx):
    """Conversations as input_ids with assistant_masks, by rendering (upstack.train.templates)."""
    from upstack.train import templates

    def encode(row: dict) -> dict:
        try:
            return templates.masked(tokenizer, row["messages"])
        except templates.PrefixError as err:
            raise ctx.fail(
                "chat_template",
                f"the chat template renders the beginning of a conversation differently from "
                f"the whole ({err}), so its assistant turns cannot be found: give a template "
                "with {% generation %} marks (chat_template: a name or a file)",
            ) from None

    return dataset.map(encode, remove_columns=dataset.column_names)
