"""cpt stage: causal-LM training on plain text (pretraining from init, or continuing an upscaled model)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from upstack.core.settings import Strict, error_at
from upstack.train.hooks import check_at_load as check_at_load  # a revision only on the Hub
from upstack.train.hooks import output_shape as output_shape  # the model's shape, kept
from upstack.train.hooks import preflight as preflight  # model, data, train_layers checked first
from upstack.train.spec import TrainingSpec

# The stage contract (upstack.core.contract)
OUTPUT = "model"  # a checkpoint
LAYER_MAP = "keeps"  # its model has its input's layers one for one
LAUNCHABLE = True  # runs under `accelerate launch` when the recipe's launch block asks


class Mixture(Strict):
    """How the sources of `datasets` share the training rows (BiMix, Ge et al. 2024), each
    source's held-out loss then logged at every eval step."""

    weights: Literal["entropy"] | list[float] = Field(
        "entropy",
        description="entropy: shares from each source's token entropy (training-free); "
        "or one share per source, in order, summing to 1 (proxy runs for `upstack mixture fit`)",
    )
    proxy: Literal["conditional", "shannon", "joint"] = Field(
        "conditional", description="conditional: H(X_t+1 | X_t); shannon: H(X_t); joint"
    )
    normalize: Literal["proportional", "softmax"] = Field(
        "proportional", description="shares proportional to the entropies, or their softmax"
    )
    sample_rows: int = Field(1000, ge=10, description="rows per source the entropy is read on")
    rows: int | None = Field(
        None,
        ge=1,
        description="training rows in all; default: as many as the scarcest source allows "
        "without repeating it (more repeats sources, which the table says)",
    )


class Spec(TrainingSpec):
    DATA_FORMAT: ClassVar[str] = "text"

    kind: Literal["cpt"] = "cpt"
    mixture: Mixture | None = None

    @model_validator(mode="after")
    def _mixture_fits(self) -> Spec:
        if self.mixture is None:
            return self
        weights = self.mixture.weights
        if isinstance(weights, list):
            if len(weights) != len(self.datasets):
                message = f"{len(weights)} shares for {len(self.datasets)} datasets: one each"
                raise error_at(("mixture", "weights"), message)
            if any(w <= 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
                message = f"shares must be positive and sum to 1 (sum {sum(weights):g})"
                raise error_at(("mixture", "weights"), message)
        for i, source in enumerate(self.datasets):
            for key in ("weight", "max_samples"):
                if key in source.model_fields_set:
                    message = "the mixture decides how much of each source to use"
                    raise error_at(("datasets", i, key), message)
        return self


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
    return build(spec, ctx)[0]


def build(spec: Spec, ctx) -> tuple[Any, dict | None]:
    """The trainer, and with a `mixture:` the table of how the sources share the rows."""
    from trl import SFTConfig, SFTTrainer

    from upstack.core.tables import markdown_table
    from upstack.train.inputs import prepare
    from upstack.train.model import model_parts
    from upstack.train.settings import trainer_config, trainer_settings

    inputs = prepare(spec, ctx, mixture=spec.mixture)
    settings = trainer_settings(spec, stage_defaults, inputs)
    if inputs.mixture:
        columns = list(next(iter(inputs.mixture.values())))
        rows = [[name, *info.values()] for name, info in inputs.mixture.items()]
        ctx.log("mixture\n" + markdown_table(["source", *columns], rows))
        if isinstance(inputs.held_out, dict) and "eval_strategy" not in spec.trainer:
            # every source's held-out loss at every logging step: the curves a mixture is judged by
            settings = {
                **settings,
                "eval_strategy": "steps",
                "eval_steps": settings["logging_steps"],
            }
    trainer = SFTTrainer(
        args=trainer_config(SFTConfig, settings, ctx),
        train_dataset=inputs.train,
        eval_dataset=inputs.held_out,
        **model_parts(spec, ctx, inputs),
    )
    return trainer, inputs.mixture


def card_tags(spec: Spec) -> list[str]:
    return ["trl"]


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

    trainer, mixture = build(spec, ctx)
    metrics = train_and_save(trainer, spec, ctx)
    return {**metrics, "mixture": mixture} if mixture else metrics
