"""The settings cpt, sft and dpo share (TrainingSpec, Adapter), the trainer fields a stage sets
itself (OWNED), and the load-time check of a recipe's `trainer:` keys and values."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from upstack.core.errors import looks_like_secret
from upstack.core.settings import StageSpec, Strict, added, error_at, names
from upstack.models.layermap import SELECTORS
from upstack.train.data import Source
from upstack.train.trl_fields import domain_problem, trackers_problem, trainer_fields, wrong_type

# Trainer fields a stage sets itself; a recipe that sets them gets told why instead.
OWNED = {
    "output_dir": "checkpoints go to the stage's work dir, the model to runs/<recipe>/<stage>",
    "resume_from_checkpoint": "a rerun resumes from the last complete checkpoint by itself",
    "seed": "the recipe's `seed` sets it",
    "push_to_hub": "the push stage uploads",
    "hub_model_id": "the push stage uploads",
    "hub_token": "the push stage uploads",
    "hub_strategy": "the push stage uploads the finished stage; checkpoints are not pushed",
    "hub_private_repo": "the push stage's `private` sets it",
    "hub_always_push": "the push stage uploads",
    "hub_revision": "the push stage uploads",
    "dataset_text_field": "cpt trains on the `text` column; rename with datasets[].columns",
    "assistant_only_loss": "sft masks to the assistant turns when the chat template marks them",
    "completion_only_loss": "sft masks to the completion when the template cannot mark turns",
    "chat_template_path": "use the stage's `chat_template`",
    "model_init_kwargs": "the stage loads the model (see `adapter` for 4-bit)",
    "local_rank": "the launcher (accelerate launch) sets it for each process",
}
FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# Names users write (other suites' recipes, older TRL and transformers) -> the field that takes the
# value now, and how. Read as that field at load, so the value wins over upstack's defaults for
# it and `upstack show` shows it there; silently ignored it would not be (transformers reads
# `gradient_checkpointing` only when `activation_checkpointing` is unset, which upstack sets).
ALIASES: dict[str, tuple[str, str]] = {
    "gradient_checkpointing": ("activation_checkpointing", "the same switch"),
    "gradient_checkpointing_kwargs": ("activation_checkpointing_kwargs", "the same options"),
    "warmup_ratio": ("warmup_steps", "transformers 5 reads a warmup_steps below 1 as a ratio"),
    "max_seq_length": ("max_length", "TRL's name since 0.20"),
    "evaluation_strategy": ("eval_strategy", "transformers' name since 4.46"),
}
# Fields other suites' recipes set that TRL no longer has, and what does their work now.
GONE = {
    "max_prompt_length": "TRL 1.x truncates prompt and completion together: set max_length",
    "max_target_length": "TRL 1.x truncates prompt and completion together: set max_length",
}


class Adapter(Strict):
    """Train a LoRA adapter (QLoRA: on a 4-bit NF4 base) instead of every weight.

    The adapter is merged into full-precision weights at the end, so the next stage and mergekit
    get a plain checkpoint; the adapter itself is kept in `adapter/`.
    """

    type: Literal["lora", "qlora", "lora-8bit"] = Field(
        "lora", description="lora; qlora: on a 4-bit NF4 base; lora-8bit: on an int8 base"
    )
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
    train_layers: Literal["all", "new", "seam", "duplicates", "experts", "peer"] | list[int] = (
        Field(
            "all",
            description="the decoder layers to train: all, new (expand's identity blocks), seam "
            "(either side of a DUS join), duplicates (later copies of a layer), experts (the "
            "routers and experts of a moe upscale, attention frozen), peer (the PEER branches of a "
            "peer upscale, the rest of their layers frozen), or indices; the rest is frozen",
        )
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
    # how the model is loaded (transformers' from_pretrained arguments users set in other suites)
    revision: str | None = Field(
        None,
        description="a Hub model's branch, tag or commit",
        json_schema_extra=added(),
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="the dtype the weights load in (auto: as saved)",
        json_schema_extra=added(),
    )
    attn_implementation: (
        Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"] | None
    ) = Field(
        None,
        description="default: flash_attention_2 on a GPU with flash-attn installed, else transformers'",
        json_schema_extra=added(),
    )
    add_special_tokens: list[str] = Field(
        default_factory=list,
        description="tokens added to the tokenizer as special tokens, their embeddings trained",
        json_schema_extra=added(),
    )

    @field_validator("trainer")
    @classmethod
    def _trainer_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_trainer_keys(value, cls.TRAINER_CONFIG)

    @model_validator(mode="after")
    def _new_tokens_are_trained(self) -> TrainingSpec:
        """Added tokens start with made-up embeddings: only training them gives them meaning."""
        if not self.add_special_tokens:
            return self
        full = self.train_layers == "all" and self.adapter is None
        embeddings = self.train_embeddings if self.train_embeddings is not None else full
        head = self.train_lm_head if self.train_lm_head is not None else full
        if not (embeddings and head):
            raise error_at(
                ("add_special_tokens",),
                "new tokens start with untrained embeddings: train them (train_embeddings: "
                "true and train_lm_head: true)",
            )
        return self

    @model_validator(mode="after")
    def _peer_trains_in_full(self) -> TrainingSpec:
        """The PEER tables are parameters LoRA does not adapt, and the up table is 0 until it
        trains: an adapter of the query network alone would leave the branch adding nothing."""
        if self.adapter is not None and self.train_layers == "peer":
            raise error_at(
                ("adapter",),
                "train_layers peer trains the PEER tables (N x d parameters, no Linear modules "
                "for LoRA), whose up table starts at 0: train them without an adapter",
            )
        return self

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


def _canonical(settings: dict[str, Any], fields: dict, config_name: str) -> dict[str, Any]:
    """`trainer:` with every alias under the field that takes its value now (ALIASES)."""
    out = {}
    for key, value in settings.items():
        if key in GONE and key not in fields:
            raise error_at((key,), f"not a field of trl.{config_name} any more: {GONE[key]}")
        if key in ALIASES:
            field, how = ALIASES[key]
            if field in settings:
                raise error_at((key,), f"the same setting as `{field}` ({how}): give one of them")
            if key == "warmup_ratio" and isinstance(value, int | float) and not 0 <= value < 1:
                raise error_at((key,), f"a ratio is >= 0 and < 1, got {value!r}")
            key = field
        out[key] = value
    return out


def check_trainer_keys(settings: dict[str, Any], config_name: str) -> dict[str, Any]:
    """Fail at recipe load, not an hour into a run: every key must be a field of the TRL config,
    and every value of a type that field takes."""
    if not settings:
        return settings
    fields = trainer_fields(config_name)
    settings = _canonical(settings, fields, config_name)
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
        if key == "report_to":
            problem = trackers_problem(value)
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
