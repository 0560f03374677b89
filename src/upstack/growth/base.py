"""What every growth method shares: the settings every method has, and the models a method reads
(a source's config and mergekit's architecture for it, found before any weight is touched)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from upstack.core.errors import UserError
from upstack.core.settings import StageSpec, names
from upstack.models.checkpoints import SIZE, model_dir_problem

if TYPE_CHECKING:
    from upstack.core.context import StageContext
    from upstack.core.refs import Reference


class GrowthSpec(StageSpec):
    """The settings every growth method has. A method's settings model subclasses this with
    `method: Literal["<its name>"] = "<its name>"` and the keys only it reads."""

    # method -> the keys only it reads, filled as each method's settings model is defined: a key
    # of another method is refused naming the method that reads it, not as an unknown key
    METHOD_KEYS: ClassVar[dict[str, frozenset[str]]] = {}

    kind: Literal["upscale"] = "upscale"
    model: str = Field(
        description="the model to grow: a stage of this recipe, a local dir or a Hub id",
        json_schema_extra=names("model"),
    )
    method: str
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="default: the source's"
    )
    # mergekit holds a whole output shard in memory before writing it: 500MB keeps the stage's
    # allocated memory under 1 GiB whatever the model size (bench/upscale.py).
    shard_size: str = Field(
        "500MB", description="bytes per output shard (mergekit's out_shard_size)"
    )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        own = set(cls.model_fields) - set(GrowthSpec.model_fields)
        GrowthSpec.METHOD_KEYS[cls.model_fields["method"].default] = frozenset(own)

    @model_validator(mode="before")
    @classmethod
    def _keys_of_other_methods(cls, data: Any) -> Any:
        """A key another method reads is an error, not silently ignored; left empty (null), it is
        as if it were not written."""
        if not isinstance(data, dict):
            return data
        method = cls.model_fields["method"].default
        kept = {}
        for key, value in data.items():
            owners = [m for m, keys in GrowthSpec.METHOD_KEYS.items() if key in keys]
            if key in cls.model_fields or not owners:
                kept[key] = value  # its own, or no method's (pydantic refuses it as unknown)
            elif value is not None:
                message = f"only for method {' or '.join(owners)}, not {method}"
                error = PydanticCustomError("recipe", "{message}", {"message": message})
                # at the key, with its value, which the recipe's error line shows
                details = InitErrorDetails(type=error, loc=(key,), input=value)
                raise ValidationError.from_exception_data("recipe", [details])
        return kept

    @field_validator("shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        if not SIZE.match(value.strip()):
            raise ValueError(f"expected a size like 2GB, 500MB or 1000000000, got {value!r}")
        return value


@dataclass
class Source:
    """A model the stage reads, as found before any weight is touched."""

    path: str  # what mergekit and transformers read: a local dir or a Hub id
    config: Any  # transformers.PretrainedConfig
    layers: int  # n
    layer_tensors: list[str]  # tensor names of layer 0, as mergekit's architecture lists them


def model_refs(ctx: StageContext) -> list[Reference]:
    """The models the stage reads: its `model`, and any a method's settings name besides."""
    return [ref for ref in ctx.refs() if ref.thing == "model"]


def planned_layers(ctx: StageContext) -> dict[str, int] | None:
    """Every model's layer count by reference key, from its config.json or, for a source this
    run builds first, the shape the recipe gives it; None when one is not known offline (a Hub
    source)."""
    from upstack.models.shapes import planned_shape

    layers = {}
    for ref in model_refs(ctx):
        shape = planned_shape(ctx.recipe, ref, ctx.pending) or {}
        if shape.get("num_hidden_layers") is None:
            return None
        layers[ref.key] = shape["num_hidden_layers"]
    return layers


def check_sources_at_load(recipe, name: str) -> None:
    """Every model the stage reads is one mergekit can read (upstack.models.merging.model_problem:
    not a multimodal wrapper, not a tied head mergekit's definition wants apart), refused at load
    on its key rather than by mergekit in the middle of the run."""
    from upstack.models.merging import model_problem

    for ref in recipe.refs(name):
        if ref.thing != "model":
            continue
        problem = model_problem(ref, recipe)
        if problem:
            raise recipe.error(("stages", name, *ref.loc), problem)


def read_sources(ctx: StageContext) -> dict[str, Source]:
    """Every model the stage reads, by key path, with its config and layer count."""
    return {ref.key: read_source(ref, ctx) for ref in model_refs(ctx)}


def read_source(ref: Reference, ctx: StageContext) -> Source:
    import huggingface_hub
    from mergekit.architecture import arch_info_for_config
    from transformers import AutoConfig

    def fail(message: str) -> UserError:
        return ctx.fail(ref.key, message)

    if ref.origin == "hub":
        path = ref.location  # mergekit downloads it; now we read only the file list and the config
        try:
            files = huggingface_hub.list_repo_files(path)
        except Exception as err:  # offline, no such repo, gated: the user's to fix, all alike
            raise fail(f"cannot list {path} on the Hub: {str(err).splitlines()[0]}") from None
        if not any(name.endswith(".safetensors") for name in files):
            raise fail(
                f"{path} has no *.safetensors weights on the Hub (upstack never loads pickled checkpoints)"
            )
    else:
        path = Path(ref.location)
        if ref.origin == "stage" and not (path / "config.json").is_file():
            raise fail(f"stage '{ref.text}' has no finished model at {path}: run it first")
        # pickled weights only if the recipe allows them (mergekit can read them then)
        problem = model_dir_problem(path, ctx.recipe.allow_pickle)
        if problem:
            raise fail(problem)
    try:
        config = AutoConfig.from_pretrained(
            str(path), trust_remote_code=ctx.recipe.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise fail(
            f"cannot read the model config of {ref.text}: {str(err).splitlines()[0]}"
        ) from None

    if not config.architectures:
        raise fail(
            f"{ref.text}: config.json names no `architectures`, so mergekit cannot map its weights"
        )
    arch = arch_info_for_config(config)
    if arch is None:
        raise fail(
            f"mergekit has no architecture definition for {config.architectures[0]} "
            "(see mergekit/_data/architectures)"
        )
    if list(arch.modules) != ["default"]:
        raise fail(
            f"{config.architectures[0]} has several modules ({', '.join(arch.modules)}); "
            "upscale grows single-stack language models only"
        )
    module = arch.modules["default"].architecture
    return Source(
        path=str(path),
        config=config,
        layers=module.num_layers(config),
        layer_tensors=[w.name for w in module.layer_weights(0, config)],
    )


def mergekit_path(source: Source) -> str:
    """A source as a mergekit config names it: absolute paths, so the config reruns anywhere
    here; a Hub id as it is."""
    path = source.path
    return str(Path(path).resolve()) if Path(path).exists() else path


def config_dtype(config: Any) -> str | None:
    """The dtype a source's config says its weights are in ("bfloat16"), None if it names none."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype else None


def local_dir(path: str) -> str:
    """A Hub id's snapshot in the local cache (mergekit downloaded it); a local dir as is."""
    if Path(path).exists():
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=["*.safetensors", "*.json"])
