"""The settings cpt, sft and dpo share (TrainingSpec, Adapter), the trainer fields a stage sets
itself (OWNED), and the load-time check of a recipe's `trainer:` keys and values."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from upstack.core.errors import looks_like_secret
from upstack.core.settings import StageSpec, Strict, error_at, names
from upstack.models.layermap import SELECTORS
from upstack.train.data import Source
from upstack.train.trl_fields import domain_problem, trainer_fields, wrong_type

# Trainer fields a stage sets itself; a recipe that sets them gets told why instead.
OWNED = {
    "output_dir": "checkpoints go to the stage's work dir, the model to runs/<recipe>/<stage>",
    "resume_from_checkpoint": "a rerun resumes from the last complete checkpoint by itself",
    "seed": "the recipe's `seed` sets it",
    "push_to_hub": "the push stage uploads",
    "hub_model_id": "the push stage uploads",
    "hub_token": "the push stage uploads",
    "dataset_text_field": "cpt trains on the `text` column; rename with datasets[].columns",
    "assistant_only_loss": "sft masks to the assistant turns when the chat template marks them",
    "completion_only_loss": "sft masks to the completion when the template cannot mark turns",
    "chat_template_path": "use the stage's `chat_template`",
    "model_init_kwargs": "the stage loads the model (see `adapter` for 4-bit)",
    "local_rank": "the launcher (accelerate launch) sets it for each process",
}
FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class Adapter(Strict):
    """Train a LoRA adapter (QLoRA: on a 4-bit NF4 base) instead of every weight.

    The adapter is merged into full-precision weights at the end, so the next stage and mergekit
    get a plain checkpoint; the adapter itself is kept in `adapter/`.
    """

    type: Literal["lora", "qlora"] = "lora"
    r: int = Field(16, ge=1, description="rank of the update matrices")
    alpha: int = Field(32, ge=1, description="scale alpha/r on the update; 2r is the usual choice")
    dropout: float = Field(0.05, ge=0, lt=1)
    # QLoRA paper: all linear layers
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainingSpec(StageSpec):
    """The fields cpt, sft and dpo share; each stage's Spec adds its own and names its TRL config."""

    TRAINER_CONFIG: ClassVar[str] = "SFTConfig"  # the trl class `trainer:` keys belong to
    DATA_FORMAT: ClassVar[str] = "text"  # what its datasets give: text, sft or preference

    model: str = Field(
        description="the model to train: a stage of this recipe, a local dir or a Hub id",
        json_schema_extra=names("model"),
    )
    datasets: list[Source] = Field(
        min_length=1,
        description="training data: a `text` column (cpt), `messages` or prompt/completion "
        "(sft), prompt/chosen/rejected (dpo)",
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="held out for eval loss if no source has eval_split"
    )
    adapter: Adapter | None = None
    # LLaMA Pro trains only its inserted blocks; after DUS one may heal only the seam. Keywords
    # resolve through the layer map of the model's upscale stage (upstack.models.layermap), however
    # many training stages lie between.
    train_layers: Literal["all", "new", "seam", "duplicates", "experts"] | list[int] = Field(
        "all",
        description="the decoder layers to train: all, new (expand's identity blocks), seam "
        "(either side of a DUS join), duplicates (later copies of a layer), experts (the "
        "routers and experts of a moe upscale, attention frozen), or indices; the rest is frozen",
    )
    train_embeddings: bool | None = Field(
        None, description="default: trained when train_layers is all (without adapter)"
    )
    train_lm_head: bool | None = Field(
        None, description="default: trained when train_layers is all (without adapter)"
    )
    trainer: dict[str, Any] = Field(
        default_factory=dict, description="fields of the stage's TRL config (SFTConfig, DPOConfig)"
    )

    @field_validator("trainer")
    @classmethod
    def _trainer_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_trainer_keys(value, cls.TRAINER_CONFIG)

    @model_validator(mode="after")
    def _generated_data_fits(self) -> TrainingSpec:
        """Generated sources give text (noise), text and conversations (arith), or text,
        conversations and preference pairs (listops)."""
        for i, source in enumerate(self.datasets):
            if source.max_tokens is not None and self.DATA_FORMAT != "text":
                message = "counts tokens of text: a cpt setting (use max_samples here)"
                raise error_at(("datasets", i, "max_tokens"), message)
            task = "arith" if source.arith else source.generated.task if source.generated else None
            if task == "noise" and self.DATA_FORMAT != "text":
                loc = ("datasets", i, "generated", "task")
                raise error_at(
                    loc, f"noise gives text only, not {self.DATA_FORMAT} data: use it in cpt"
                )
            if task == "arith" and self.DATA_FORMAT == "preference":
                loc = ("datasets", i, "arith" if source.arith else "generated")
                raise error_at(loc, f"{task} gives text or conversations, not preference pairs")
        return self

    @field_validator("train_layers", mode="before")
    @classmethod
    def _layer_selection(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("all", *SELECTORS):
            raise ValueError(
                f"expected all, {', '.join(SELECTORS)} or a list of layer indices, got {value!r}"
            )
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty list trains no layer: list indices, or use all")
            for i, index in enumerate(value):
                if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                    raise error_at((i,), f"a layer index is an integer >= 0, got {index!r}")
                if index in value[:i]:
                    raise error_at((i,), f"layer {index} is listed twice")
        return value


def check_trainer_keys(settings: dict[str, Any], config_name: str) -> dict[str, Any]:
    """Fail at recipe load, not an hour into a run: every key must be a field of the TRL config,
    and every value of a type that field takes."""
    if not settings:
        return settings
    fields = trainer_fields(config_name)
    settings = dict(settings)
    for key, value in settings.items():
        if key in OWNED:
            raise error_at((key,), f"set by the stage, not the recipe ({OWNED[key]})")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise error_at((key,), f"unknown key (not a field of trl.{config_name}{hint})")
        # YAML 1.1 reads `2e-5` (no dot) as a string; TRL's own CLI parser would make it a float
        if isinstance(value, str) and "float" in fields[key] and FLOAT.fullmatch(value):
            settings[key] = value = float(value)
        expected = wrong_type(fields[key], value)
        if expected:
            shown = "a value that looks like a secret" if looks_like_secret(value) else repr(value)
            raise error_at((key,), f"expected {expected} (trl.{config_name}), got {shown}")
        problem = domain_problem(key, value)
        if problem:
            raise error_at((key,), problem)
    return settings


class ChatSpec(TrainingSpec):
    """A training stage on conversations (sft, dpo): they are rendered with a chat template."""

    chat_template: str | None = Field(
        None,
        description="a name (chatml, llama3, zephyr, mistral, gemma, phi3: with the marks that "
        "train every assistant turn), a .jinja file (relative to the recipe) or a Jinja string; "
        "default: the tokenizer's",
    )

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Found at load, not when the stage starts after the stages before it ran."""
        from upstack.train import templates

        recipe_dir = (info.context or {}).get("recipe_dir")
        if value is not None and recipe_dir is not None:
            problem = templates.problem(value, Path(recipe_dir))
            if problem:
                raise ValueError(problem)
        return value
