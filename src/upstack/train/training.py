"""What cpt, sft and dpo share: spec fields, trainer settings, models and adapters, resume, guards, saved checkpoints."""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from upstack.core.context import is_main_process
from upstack.core.errors import looks_like_secret
from upstack.core.settings import StageSpec, Strict, error_at, names
from upstack.models.layermap import SELECTORS
from upstack.train.data import Source, check_sources

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
}
CHECKPOINTS = "checkpoints"
# rows from which tokenizing in worker processes pays for starting them
TOKENIZE_IN_PARALLEL = 50_000
FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")


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


def preflight(spec: TrainingSpec, ctx) -> None:
    """The runner's preflight for cpt, sft and dpo: the model is a checkpoint upstack can load,
    every data source is where it says and has the columns the stage needs, `train_layers`
    names layers the model has."""
    from upstack.models.checkpoints import check_model

    check_model(ctx)
    check_sources(spec.datasets, ctx, spec.DATA_FORMAT)
    check_train_layers(spec, ctx)


def check_train_layers(spec: TrainingSpec, ctx) -> None:
    """Before anything runs: `train_layers` names layers the model will have. The layer count
    comes from the recipe (upstack.models.shapes) and a keyword's layers from the layer map the upscale
    ancestor recorded, or will record (planned from the recipe); where neither is known offline
    (a Hub model, a seam an analysis places in this run) the check waits for the stage's start."""
    from upstack.models import layermap
    from upstack.models.shapes import planned_shape

    if spec.train_layers == "all":
        return
    ref = ctx.ref("model")
    shape = planned_shape(ctx.recipe, ref, ctx.pending) or {}
    layermap.train_layers(spec.train_layers, ctx, shape.get("num_hidden_layers"))


def output_shape(spec: TrainingSpec, input_shape):
    """Training keeps its model's shape."""
    return input_shape("model")


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
        expected = _wrong_type(fields[key], value)
        if expected:
            shown = "a value that looks like a secret" if looks_like_secret(value) else repr(value)
            raise error_at((key,), f"expected {expected} (trl.{config_name}), got {shown}")
    return settings


# The types a TRL field annotation names, as YAML gives them; anything else (an enum, a config
# class, Literal) is left for TRL to judge.
YAML_TYPES = {
    "bool": (bool,),
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "list": (list, str),  # TRL turns a lone string into a one-element list (report_to, loss_type)
    "dict": (dict, str),  # a JSON string is accepted where TRL takes a dict
    "None": (type(None),),
    "NoneType": (type(None),),
}


def _wrong_type(annotation: str, value: Any) -> str | None:
    """What a field of this annotation expects, when `value` is none of it; else None."""
    names = [_base_name(member) for member in _union_members(annotation)]
    if any(name not in YAML_TYPES for name in names):
        return None  # a type we cannot judge from YAML: TRL will
    for name in names:
        accepted = YAML_TYPES[name]
        # YAML's true/false are not numbers here, even though bool subclasses int in Python
        if isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted):
            return None
    return " or ".join(dict.fromkeys("null" if n in ("None", "NoneType") else n for n in names))


def _union_members(annotation: str) -> list[str]:
    """'int | None' -> ['int', 'None']; "typing.Optional[int]" -> ['int', 'None']."""
    text = re.sub(r"<class '([\w.]+)'>", r"\1", annotation.strip()).replace("typing.", "")
    match = re.fullmatch(r"(Union|Optional)\[(.*)\]", text)
    members = _split_top(match.group(2), ",") if match else _split_top(text, "|")
    if match and match.group(1) == "Optional":
        members.append("None")
    if len(members) == 1 and members[0] == text:
        return [text]
    return [inner for member in members for inner in _union_members(member)]


def _split_top(text: str, separator: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char == "[") - (char == "]")
        if char == separator and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def _base_name(member: str) -> str:
    """'dict[str, Any]' -> 'dict'; 'transformers.trainer_utils.SchedulerType' -> 'SchedulerType'."""
    return member.split("[", 1)[0].rsplit(".", 1)[-1]


@dataclass
class Inputs:
    """What a training stage builds its trainer from, loaded and checked before any step."""

    model_path: str
    tokenizer: Any
    train: Any  # datasets.Dataset
    held_out: Any  # datasets.Dataset, a dict of them by source name (a mixture), or None
    marks_turns: bool  # the chat template marks assistant turns ({% generation %})
    mixture: dict | None = None  # source name -> share, rows, entropies (cpt's `mixture:`)


def prepare(spec: TrainingSpec, ctx, chat_template: str | None = None, mixture=None) -> Inputs:
    """The tokenizer (with the stage's chat template, required for conversations) and the data
    mixture of the stage's format (text, sft, preference), each source checked. With a
    `mixture` (cpt), the sources share the rows as it says and keep their own held-out sets."""
    from upstack.train.data import build_mixture, build_weighted_mixture

    fmt = spec.DATA_FORMAT
    model_path = ctx.ref("model").location
    tokenizer = load_tokenizer(model_path, ctx, chat_template)
    marks_turns = fmt != "text" and require_chat_template(tokenizer, ctx, model_path)
    from accelerate import PartialState

    # Under accelerate, rank 0 reads (and streams) the data first; the other ranks then find
    # what it wrote (streamed selections, datasets' caches) instead of all reading the corpus.
    with PartialState().main_process_first():
        if mixture is not None:
            train_rows, held_out, report = build_weighted_mixture(
                spec.datasets, mixture, tokenizer, ctx, spec.eval_fraction
            )
            return Inputs(model_path, tokenizer, train_rows, held_out, marks_turns, report)
        train_rows, held_out = build_mixture(
            spec.datasets, fmt, ctx, spec.eval_fraction, tokenizer=tokenizer
        )
    return Inputs(model_path, tokenizer, train_rows, held_out, marks_turns)


def model_parts(spec: TrainingSpec, ctx, inputs: Inputs) -> dict[str, Any]:
    """The trainer arguments every stage passes alike: the model with what it does not train
    frozen, its adapter config (limited to the trained layers), the guards."""
    from upstack.train import trainable

    model = load_model(inputs.model_path, spec.adapter, ctx)
    parts = trainable_parts(spec, ctx, model)
    peft_config = None
    if spec.adapter is None:
        trainable.freeze(model, parts)
    else:
        targets = spec.adapter.target_modules
        if spec.train_layers != "all":
            targets = trainable.lora_targets(model, parts, targets)
            if not targets and parts.within:
                raise ctx.fail(
                    "adapter",
                    f"train_layers {spec.train_layers} trains the {parts.within} blocks, whose "
                    "experts transformers keeps as fused 3-D tensors, not the Linear modules "
                    "upstack limits LoRA to: train them without an adapter (or use "
                    "train_layers: all, where peft's all-linear adapts them too)",
                )
            if not targets:
                raise ctx.fail(
                    "adapter.target_modules",
                    f"no Linear module of layers {list(parts.layers)} matches "
                    f"{spec.adapter.target_modules}",
                )
        peft_config = lora_config(spec.adapter, targets, trainable.modules_to_save(model, parts))
    callbacks = [nan_guard(ctx)]
    from upstack.train import routing

    if routing.is_moe(model.config):  # how the routers spread the tokens, for the manifest
        callbacks.append(routing.router_load(model))
    from upstack.core.cpu import budget_threads

    if not on_gpu() and budget_threads():
        from upstack.core.cpu import thread_budget

        callbacks.append(thread_budget())  # share the CPU with whatever else runs beside
    return {
        "model": model,
        "processing_class": inputs.tokenizer,
        "peft_config": peft_config,
        "callbacks": callbacks,
    }


def trainable_parts(spec: TrainingSpec, ctx, model):
    """What of `model` the stage trains (upstack.train.trainable), checked against the model itself."""
    from upstack.train import trainable

    parts = trainable.resolve(spec, ctx, model.config.num_hidden_layers)
    if trainable.is_tied(model) and parts.embeddings != parts.lm_head:
        raise ctx.fail(
            "train_lm_head" if spec.train_lm_head is not None else "train_embeddings",
            "the model ties lm_head to the embeddings (one tensor): "
            "set train_embeddings and train_lm_head alike",
        )
    return parts


def train_and_save(trainer, spec: TrainingSpec, ctx) -> dict[str, Any]:
    """Train (resuming when an earlier attempt left a checkpoint), then save a plain checkpoint.
    The manifest gets the effective trainer settings: every field that differs from TRL's default."""
    from upstack.train import trainable

    metrics = train(trainer, ctx)
    metrics.update(router_metrics(trainer, ctx))
    layers = trainer.model.config.num_hidden_layers
    trained = trainable.resolve(spec, ctx, layers).record(spec.train_layers)
    trained.update(trainable.counted(trainer), adapter=spec.adapter.type if spec.adapter else None)
    save(trainer, trainer.processing_class, ctx.ref("model").location, spec.adapter, ctx)
    return {**metrics, "trained": trained, "trainer_settings": changed_fields(trainer.args)}


def router_metrics(trainer, ctx) -> dict[str, Any]:
    """A mixture of experts: the tokens each expert got per layer (upstack.train.routing), logged as a
    table, and the load-balancing loss weight TRL trained with."""
    from upstack.train import routing

    found = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "RouterLoad"]
    if not found:
        return {}
    load = routing.load_metrics(found[0], trainer.accelerator)
    for mode in ("train", "eval"):
        if mode in load:
            ctx.log(
                f"router load ({mode}: fraction of routed tokens per expert)\n"
                + routing.load_table(load, mode)
            )
    load["router_aux_loss_coef"] = getattr(trainer, "router_aux_loss_coef", None)
    load["aux_loss_enabled"] = getattr(trainer, "aux_loss_enabled", None)
    return {"router_load": load}


def changed_fields(config) -> dict[str, Any]:
    """The fields of a TRL config whose value differs from the class's declared default, as
    plain values (where checkpoints go is the work dir's business, not a setting)."""
    import dataclasses

    values = config.to_dict()
    changed = {}
    for field in dataclasses.fields(config):
        if (
            not field.init
            or field.name in ("output_dir", "logging_dir")
            or field.name not in values
        ):
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        if values[field.name] != getattr(default, "value", default):  # enums compare by value
            changed[field.name] = values[field.name]
    return changed


def trainer_fields(config_name: str) -> dict[str, str]:
    """Field name -> type of a TRL config class. Importing trl takes seconds (torch comes with it),
    so the names are cached per TRL version and `upstack status` stays quick."""
    from upstack.core.check_cache import library_facts

    def fields() -> dict[str, str]:
        import dataclasses

        import trl

        config = getattr(trl, config_name)
        return {f.name: str(f.type) for f in dataclasses.fields(config) if f.init}

    return library_facts("trl", config_name, fields)


def upstack_defaults(on_gpu: bool) -> dict[str, Any]:
    """What upstack sets in every TRL config before the stage's defaults and the recipe's
    `trainer:` block (both win over these), as TRL documents its own departures from
    TrainingArguments."""
    import importlib.util

    return {
        "bf16": on_gpu,  # on a GPU without bf16 (pre-Ampere) the recipe sets fp16 instead
        "fp16": False,
        # recomputing activations saves GPU memory on big models; on CPU it only costs time
        "activation_checkpointing": on_gpu,
        "use_cpu": not on_gpu,
        "use_liger_kernel": on_gpu and importlib.util.find_spec("liger_kernel") is not None,
        "report_to": "none",
        "logging_steps": 10,
        "logging_first_step": True,
        "logging_nan_inf_filter": False,  # the NaN guard must see a NaN loss, not an average without it
        "include_num_input_tokens_seen": "non_padding",
        "save_steps": 500,
        "save_total_limit": 2,  # checkpoints are big; resume needs only the last complete one
    }


def trainer_settings(
    spec: TrainingSpec, stage_defaults, inputs: Inputs | None = None
) -> dict[str, Any]:
    """Every setting the TRL config gets but output_dir and seed, on this machine: upstack's
    defaults, then the stage's (`stage_defaults(flash_attention)`), then the recipe's `trainer:`.
    With the data in hand, a large data set is tokenized by several worker processes."""
    gpu = on_gpu()
    defaults = upstack_defaults(gpu)
    if inputs is not None and len(inputs.train) >= TOKENIZE_IN_PARALLEL:
        defaults["dataset_num_proc"] = min(8, len(os.sched_getaffinity(0)))
    if spec.trainer.get("fp16"):
        defaults["bf16"] = False
    if gpu:
        import torch

        defaults["bf16"] = defaults["bf16"] and torch.cuda.is_bf16_supported()
    return {**defaults, **stage_defaults(flash_attention()), **spec.trainer}


def trainer_config(config_cls: type, settings: dict[str, Any], ctx):
    """The TRL config from `trainer_settings`, with the checkpoints in the stage's work dir."""
    try:
        return config_cls(**settings, output_dir=str(ctx.work_dir / CHECKPOINTS), seed=ctx.seed)
    except (TypeError, ValueError) as err:
        raise ctx.fail("trainer", str(err).strip().splitlines()[0]) from None


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def load_tokenizer(model_path: str, ctx, chat_template: str | None = None):
    from upstack.models.checkpoints import load_tokenizer as load

    tokenizer = load(model_path, ctx.recipe, lambda message: ctx.fail("model", message))
    if chat_template:
        if "{%" not in chat_template and "{{" not in chat_template:
            path = Path(chat_template)
            if not path.is_file():
                raise ctx.fail("chat_template", f"{path}: file not found")
            chat_template = path.read_text()
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs one; labels mask it anyway
    return tokenizer


def require_chat_template(tokenizer, ctx, model_path: str) -> bool:
    """Before any training: conversations need a template. True when it marks assistant turns."""
    if not tokenizer.chat_template:
        raise ctx.fail(
            "",
            f"model {model_path} has no chat template; "
            "set `chat_template:` (a Jinja string or a .jinja file)",
        )
    return bool(GENERATION_MARK.search(tokenizer.chat_template))


def load_model(model_path: str, adapter: Adapter | None, ctx):
    """The model to train; for QLoRA its Linear layers in 4-bit NF4 (bitsandbytes, CPU or GPU)."""
    import torch
    from transformers import BitsAndBytesConfig

    from upstack.models import checkpoints

    kwargs: dict[str, Any] = {}
    if flash_attention():
        kwargs["attn_implementation"] = "flash_attention_2"  # what padding-free batches need
    if adapter is not None and adapter.type == "qlora":
        from accelerate import PartialState

        on_gpu = torch.cuda.is_available()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if on_gpu else torch.float32,
        )
        kwargs["device_map"] = {"": PartialState().local_process_index if on_gpu else "cpu"}
    fail = lambda message: ctx.fail("model", message)  # noqa: E731
    return checkpoints.load_model(model_path, ctx.recipe, fail, **kwargs)


def flash_attention() -> bool:
    """On a GPU with flash-attn installed: sequences are concatenated without padding (padding_free)."""
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def lora_config(
    adapter: Adapter | None,
    target_modules: list[str] | str | None = None,
    modules_to_save: list[str] | None = None,
):
    """peft's LoraConfig; `target_modules`: the adapter's, or the full module names of the
    trained layers; `modules_to_save`: embeddings or head trained in full beside the adapter."""
    if adapter is None:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=target_modules or adapter.target_modules,
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )


# --------------------------------------------------------------------------- guards and resume


def nan_guard(ctx):
    """A TrainerCallback that stops training at the first non-finite loss or gradient norm."""
    from transformers import TrainerCallback

    class StopOnNonFinite(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                if value is not None and not math.isfinite(value):
                    raise ctx.fail(
                        "",
                        f"training {key} is {value} at step {state.global_step}; "
                        "lower trainer.learning_rate or check the data",
                    )

    return StopOnNonFinite()


def resume_checkpoint(ctx) -> Path | None:
    """The last complete checkpoint of an earlier attempt with the same settings, if any.

    The Trainer writes trainer_state.json last, after weights, optimizer and RNG state; a
    checkpoint dir without a readable one for its own step was cut off mid-save and is skipped.
    """
    root = ctx.work_dir / CHECKPOINTS
    stamp = root / "config_hash"
    if is_main_process():
        if root.exists() and (not stamp.exists() or stamp.read_text() != ctx.config_hash):
            shutil.rmtree(root)  # checkpoints of other settings would resume the wrong run
        root.mkdir(parents=True, exist_ok=True)
        stamp.write_text(ctx.config_hash)

    def step_of(path: Path) -> int:
        tail = path.name.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    for checkpoint in sorted(root.glob("checkpoint-*"), key=step_of, reverse=True):
        try:
            state = json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            ctx.log(f"skipping {checkpoint.name}: incomplete (no readable trainer_state.json)")
            continue
        if state.get("global_step") == step_of(checkpoint):
            return checkpoint
        ctx.log(f"skipping {checkpoint.name}: its trainer_state.json is for another step")
    return None


# --------------------------------------------------------------------------- train and save


def train(trainer, ctx) -> dict[str, Any]:
    """Train (resuming if an earlier attempt left a checkpoint), evaluate; metrics for the manifest."""
    import resource

    import torch

    checkpoint = resume_checkpoint(ctx)
    tokens_before = 0
    if checkpoint is not None:
        ctx.log(f"resuming from {checkpoint.name}")
        tokens_before = json.loads((checkpoint / "trainer_state.json").read_text()).get(
            "num_input_tokens_seen", 0
        )
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - start
    evaluated = trainer.evaluate() if trainer.eval_dataset is not None else {}
    # one held-out set logs eval_loss; a mixture's sets log eval_<source>_loss each. Named from
    # the sets, not read from the keys: a mixture of experts also logs eval_aux_loss
    sources = eval_sources(trainer)
    by_source = {
        name: evaluated[f"eval_{name}_loss"] for name in sources if f"eval_{name}_loss" in evaluated
    }
    eval_loss = evaluated.get("eval_loss")
    if eval_loss is None and by_source:
        eval_loss = sum(by_source.values()) / len(by_source)  # the sources' mean

    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    tokens = trainer.state.num_input_tokens_seen
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics = {
        # the first four scalars are what `upstack status` shows
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "eval_loss": eval_loss,
        "steps": trainer.state.global_step,
        "train_loss_mean": result.training_loss,
        "processes": trainer.accelerator.num_processes,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "resumed_from_step": int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint else 0,
        "tokens_seen": tokens,
        "tokens_per_second": round((tokens - tokens_before) / max(seconds, 1e-9), 1),
        "train_seconds": round(seconds, 2),
        "peak_memory_mb": round(peak_mb, 1),
        "loss_curve": [[h["step"], h["loss"]] for h in history if "loss" in h],
    }
    if by_source:  # each source's held-out loss at every eval step: is a domain starved?
        metrics["eval_loss_by_source"] = {name: round(v, 5) for name, v in by_source.items()}
        # the last evaluation at a step wins (the final evaluate() repeats the last eval step)
        metrics["eval_curves"] = {
            name: sorted(
                {
                    h["step"]: h[f"eval_{name}_loss"] for h in history if f"eval_{name}_loss" in h
                }.items()
            )
            for name in by_source
        }
    for key in ("rewards/accuracies", "rewards/margins"):
        values = [h[key] for h in history if key in h and "loss" in h]
        if values:
            name = key.split("/")[1].rstrip("s").replace("accuracie", "accuracy")
            metrics[f"reward_{name}_first"], metrics[f"reward_{name}_last"] = values[0], values[-1]
    return metrics


def save(trainer, tokenizer, model_path: str, adapter: Adapter | None, ctx) -> None:
    """A plain HF checkpoint at the stage dir's root (adapters merged), plus loss.png.

    Every rank calls this (saving a sharded model is collective); only rank 0 writes files.
    """
    if adapter is None:
        trainer.save_model(str(ctx.out_dir))
    else:
        trainer.save_model(str(ctx.out_dir / "adapter"))
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return
    if adapter is not None:
        merge_adapter(model_path, ctx.out_dir / "adapter", ctx.out_dir, ctx)
    for pickled in ctx.out_dir.rglob("training_args.bin"):
        pickled.unlink()  # a pickle; the manifest holds the settings as JSON
    finish_checkpoint(ctx.out_dir, tokenizer)
    plot_losses(
        trainer.state.log_history,
        ctx.out_dir / "loss.png",
        f"{ctx.recipe.name} / {ctx.name}",
        eval_sources(trainer),
    )
    # big, and the stage is done: checkpoints and the streamed selections of its data
    shutil.rmtree(ctx.work_dir / CHECKPOINTS, ignore_errors=True)
    shutil.rmtree(ctx.work_dir / "streamed", ignore_errors=True)


def merge_adapter(base_path: str, adapter_dir: Path, out_dir: Path, ctx) -> None:
    """Base reloaded in full precision (never the 4-bit copy) + adapter, merged into plain weights."""
    from peft import PeftModel

    from upstack.models.checkpoints import load_model

    base = load_model(base_path, ctx.recipe, lambda message: ctx.fail("model", message))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)


def finish_checkpoint(out_dir: Path, tokenizer) -> None:
    """What training leaves wrong for inference: use_cache off, generation config without eos/pad."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(out_dir)
    config.use_cache = True  # training turns the KV cache off
    if hasattr(config, "output_router_logits"):
        config.output_router_logits = (
            False  # TRL turned them on for the aux loss; inference needs none
        )
    config.save_pretrained(out_dir)
    try:
        generation = GenerationConfig.from_pretrained(out_dir)
    except OSError:
        generation = GenerationConfig()
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)  # with its chat template


def eval_sources(trainer) -> list[str]:
    """The names of a mixture's held-out sets (a dict of eval data sets); none for one set."""
    held_out = trainer.eval_dataset
    return sorted(held_out) if isinstance(held_out, dict) else []


def plot_losses(history: list[dict], path: Path, title: str, sources: list[str] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = [("loss", "train"), ("eval_loss", "eval")]
    series += [(f"eval_{name}_loss", f"eval {name}") for name in sources]  # one per source
    for key, label in series:
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(
                *zip(*points, strict=True),
                marker="." if label.startswith("eval") else None,
                label=label,
            )
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
