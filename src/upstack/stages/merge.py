"""merge stage: any mergekit merge method over stage outputs or outside models, checked at recipe load."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, model_validator

from upstack.checkpoints import count_parameters
from upstack.recipe import StageSpec, Strict, error_at, names, used_for

# mergekit's tokenizer settings that are not a model
TOKENIZER_KEYWORDS = ("base", "union")

# Files a checkpoint needs beside its weights that not every mergekit code path carries over
# (a `tokenizer_source` merge re-serializes the tokenizer and drops generation_config.json).
CARRIED_FILES = ("generation_config.json", "chat_template.jinja")


class MergeModel(Strict):
    model: str = Field(
        description="a stage name, a local path or a Hub id", json_schema_extra=names("model")
    )
    parameters: dict[str, Any] | None = Field(
        None, description="per-model settings of the method (weight, density, ...)"
    )


class MergeTokenizer(Strict):
    """mergekit's `tokenizer:` block: build the merged vocabulary, and pad it as the model wants."""

    source: str = Field(
        "union",
        description="union | base | a model (stage name, path, Hub id)",
        json_schema_extra={**names("model", keywords=TOKENIZER_KEYWORDS), **used_for("tokenizer")},
    )
    pad_to_multiple_of: int | None = Field(
        None, ge=1, description="e.g. 64, as init pads its vocab"
    )
    tokens: dict[str, Any] | None = Field(
        None, description="per-token embedding sources (mergekit)"
    )


class Spec(StageSpec):
    """mergekit's own config keys, with stage names allowed wherever a model goes."""

    kind: Literal["merge"] = "merge"
    merge_method: str = Field(description="a mergekit method: linear, slerp, ties, dare_ties, ...")
    models: list[MergeModel] = Field(min_length=1)
    base_model: str | None = Field(
        None,
        description="needed by slerp, ties, task_arithmetic, ...",
        json_schema_extra=names("model"),
    )
    parameters: dict[str, Any] | None = Field(
        None, description="settings for every model (t, normalize, lambda, ...)"
    )
    dtype: str | None = Field(None, description="dtype the merge computes in")
    out_dtype: str | None = Field(None, description="dtype the merged weights are saved in")
    tokenizer_source: str | None = Field(
        None,
        description="base | union | a model; default: the base model's tokenizer is copied",
        json_schema_extra={**names("model", keywords=TOKENIZER_KEYWORDS), **used_for("tokenizer")},
    )
    tokenizer: MergeTokenizer | None = Field(
        None, description="instead of tokenizer_source, with pad_to_multiple_of / tokens"
    )
    chat_template: str | None = Field(
        None, description="a template, a mergekit template name or 'auto'; default: carried over"
    )
    # Each shard is written and freed before the next; with lazy per-tensor loading this is
    # what bounds peak memory, not the model size.
    out_shard_size: int | str = Field(
        "5B", description="parameters per output shard: 500M, 5B, ..."
    )

    @model_validator(mode="after")
    def _check_against_mergekit(self, info: ValidationInfo) -> Spec:
        if not (info.context or {}).get("deep", True):
            return self  # `upstack status`/`report`: importing mergekit (peft, torch) costs ~8 s
        problem = mergekit_problem(self)
        if problem:
            raise error_at(*problem)
        return self


def mergekit_config(spec: Spec, resolve=lambda ref: ref) -> dict[str, Any]:
    """The mergekit YAML for this stage, with every model reference passed through `resolve`."""
    config: dict[str, Any] = {
        "merge_method": spec.merge_method,
        "models": [
            {
                "model": resolve(entry.model),
                **({"parameters": entry.parameters} if entry.parameters else {}),
            }
            for entry in spec.models
        ],
    }
    if spec.base_model:
        config["base_model"] = resolve(spec.base_model)
    if spec.tokenizer_source:
        source = spec.tokenizer_source
        config["tokenizer_source"] = source if source in TOKENIZER_KEYWORDS else resolve(source)
    if spec.tokenizer:
        tokenizer = spec.tokenizer.model_dump(exclude_none=True)
        if tokenizer["source"] not in TOKENIZER_KEYWORDS:
            tokenizer["source"] = resolve(tokenizer["source"])
        config["tokenizer"] = tokenizer
    for key in ("parameters", "dtype", "out_dtype", "chat_template"):
        if getattr(spec, key) is not None:
            config[key] = getattr(spec, key)
    return config


def mergekit_problem(spec: Spec) -> tuple[tuple, str] | None:
    """(key path, message) for the first thing mergekit would reject when the merge runs, or None.

    mergekit only finds these once it has loaded every model; here they fail at recipe load.
    """
    from mergekit.common import dtype_from_name, parse_kmb
    from mergekit.config import MergeConfiguration, evaluate_setting
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import BasePolicy, ParameterScope

    methods = {method.spec.name: method for method in registry.registered_methods()}
    name = spec.merge_method
    if name not in methods:
        known_methods = ", ".join(sorted(methods))
        return ("merge_method",), f"unknown merge method '{name}' (mergekit has: {known_methods})"
    method = methods[name]
    contract = method.spec.contract

    try:
        MergeConfiguration.model_validate(mergekit_config(spec))
    except ValidationError as err:
        first = err.errors()[0]
        return tuple(first["loc"]), f"mergekit: {first['msg']}"
    except RuntimeError as err:  # mergekit's cross-field checks raise RuntimeError, not ValueError
        return (), f"mergekit: {err}"
    for key in ("dtype", "out_dtype"):
        value = getattr(spec, key)
        try:
            dtype_from_name(value)
        except RuntimeError:
            return (key,), f"not a dtype mergekit knows (float32, bfloat16, ...): {value!r}"
    try:
        parse_kmb(spec.out_shard_size)
    except (ValueError, IndexError):
        return ("out_shard_size",), f"not a size like 500M or 5B (got {spec.out_shard_size!r})"

    base = spec.base_model
    if contract.base == BasePolicy.REQUIRED and not base:
        return ("base_model",), f"merge_method '{name}' needs a base_model"
    if contract.base == BasePolicy.FORBIDDEN and base:
        return ("base_model",), f"merge_method '{name}' takes no base_model"
    # mergekit merges the base model too when it is not among `models` (it adds it as an input).
    inputs = [entry.model for entry in spec.models]
    if base and base not in inputs:
        inputs.append(base)
    try:
        method.validate_inputs(inputs, base)
    except ValueError as err:
        return ("models",), f"merge_method '{name}': {err} (base_model counts as an input)"

    known = {p.name: p for p in method.spec.parameters}
    takes = ", ".join(known) or "no parameters"
    settings = [(("parameters",), spec.parameters or {})]
    settings += [
        (("models", i, "parameters"), e.parameters or {}) for i, e in enumerate(spec.models)
    ]
    for loc, values in settings:
        for key, value in values.items():
            if key not in known:
                return (*loc, key), f"unknown parameter '{key}' for {name} (takes: {takes})"
            if loc[0] == "models" and known[key].scope == ParameterScope.SHARED:
                message = f"'{key}' applies to the whole {name} merge: set it under parameters"
                return (*loc, key), message
            try:
                evaluate_setting("", value, validate=known[key].validate)
            except (ValidationError, ValueError, TypeError, RuntimeError) as err:
                return (*loc, key), f"not a valid value for {name}'s '{key}': {err}".splitlines()[0]

    shared = spec.parameters or {}
    listed = [entry.model for entry in spec.models]
    for parameter in method.spec.parameters:
        if not parameter.required or parameter.name in shared:
            continue
        if parameter.scope == ParameterScope.SHARED:
            return ("parameters", parameter.name), f"required by merge_method '{name}'"
        for i, entry in enumerate(spec.models):
            skip_base = parameter.scope == ParameterScope.NON_BASE and entry.model == base
            if not skip_base and parameter.name not in (entry.parameters or {}):
                return (
                    ("models", i, "parameters", parameter.name),
                    f"required by merge_method '{name}' for every model"
                    + (" but the base" if parameter.scope == ParameterScope.NON_BASE else ""),
                )
        if parameter.scope == ParameterScope.INPUT and base and base not in listed:
            return ("base_model",), (
                f"'{base}' is merged too and needs '{parameter.name}': list it "
                f"under models with one, or set parameters.{parameter.name}"
            )
    return None


def preflight(spec: Spec, ctx) -> None:
    """Before the runner writes anything: every local input is a loadable safetensors checkpoint,
    and all inputs have the same shapes, including those this run builds first (as the recipe
    gives them). Hub inputs are left to mergekit."""
    from upstack.checkpoints import model_dir_problem
    from upstack.shapes import SHAPE_KEYS, differences, planned_shape

    # a tokenizer_source merge aligns the vocabularies; everything else must match as is
    aligned = spec.tokenizer_source or spec.tokenizer
    keys = tuple(k for k in SHAPE_KEYS if not (k == "vocab_size" and aligned))
    shapes: dict[str, tuple[str, dict]] = {}
    for ref in ctx.refs():
        if ref.origin == "hub" or ref.use == "tokenizer":
            continue
        if not ctx.is_pending(ref):
            problem = model_dir_problem(Path(ref.location), ctx.recipe.allow_pickle)
            if problem:
                raise ctx.fail(ref.key, problem)
        shape = planned_shape(ctx.recipe, ref, ctx.pending)
        if shape is None:
            continue
        for other_key, (other_text, other_shape) in shapes.items():
            differ = differences(shape, other_shape, keys)
            if differ:
                raise ctx.fail(
                    ref.key,
                    f"'{ref.text}' does not match '{other_text}' ({other_key}): "
                    f"{', '.join(differ)}; merged models need the same shapes",
                )
        shapes[ref.key] = (ref.text, shape)


def output_shape(spec: Spec, input_shape) -> dict | None:
    """The merged model has its inputs' shape (the vocab of a tokenizer merge is known only after)."""
    shape = input_shape("models.0.model")
    if shape is not None and (spec.tokenizer_source or spec.tokenizer):
        shape = {**shape, "vocab_size": None}
    return shape


def run(spec: Spec, ctx) -> dict:
    import yaml
    from mergekit.common import parse_kmb
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = mergekit_config(spec, resolve=ctx.location)
    for ref in ctx.refs():
        if ref.origin == "stage" and not Path(ref.location, "config.json").is_file():
            raise ctx.fail(
                ref.key, f"stage '{ref.text}' wrote no model (no {ref.location}/config.json)"
            )
    # The exact config mergekit ran, paths resolved: `mergekit-yaml mergekit_config.yml OUT` redoes it.
    config_text = yaml.safe_dump(config, sort_keys=False)
    (ctx.out_dir / "mergekit_config.yml").write_text(config_text)
    ctx.log(f"{spec.merge_method} over {len(spec.models)} models")
    run_merge(
        MergeConfiguration.model_validate(config),
        str(ctx.out_dir),
        MergeOptions(
            copy_tokenizer=True,
            out_shard_size=parse_kmb(spec.out_shard_size),
            trust_remote_code=ctx.recipe.trust_remote_code,
            random_seed=ctx.seed,  # dare/della drop weights at random
            write_model_card=False,  # the push stage writes the card, with the whole lineage
            safe_serialization=True,
        ),
        config_source=config_text,
    )
    donor = Path(config.get("base_model") or config["models"][0]["model"])
    for file_name in CARRIED_FILES:
        if (donor / file_name).is_file() and not (ctx.out_dir / file_name).exists():
            shutil.copy(donor / file_name, ctx.out_dir / file_name)
    return {
        "method": spec.merge_method,
        "models": [entry.model for entry in spec.models],
        "base_model": spec.base_model,
        "parameters": count_parameters(ctx.out_dir),
    }
