"""What the merge and upscale stages share about mergekit's configuration, read from mergekit's own models."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from upstack.core.keys import KeyPath

Loc = tuple  # a key path inside a stage's settings: ("slices", 0, "parameters", "t")
Problem = tuple[Loc, str]  # (key path, message): what a validator turns into one error line


# --------------------------------------------------------------------------- where models go


def reference_positions() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Every place in a mergekit config that holds a model, as (key pattern, keywords): "*" is
    any list index or mapping key, keywords are the other values that place takes (`union`).

    Read from the types of mergekit's MergeConfiguration (each ModelReference field), so a
    mergekit that adds one is followed without a change here. Importing mergekit takes seconds
    (torch, peft): the positions are cached per mergekit version, so `upstack status` stays quick.
    """
    from upstack.core.check_cache import library_facts

    found = library_facts("mergekit", "references", _reference_positions)
    return [(tuple(path), tuple(keywords)) for path, keywords in found]


def _reference_positions() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    from mergekit.common import ModelReference
    from mergekit.config import MergeConfiguration

    found: list[tuple[tuple[str, ...], tuple[str, ...]]] = []

    def walk(annotation: Any, path: tuple[str, ...], keywords: tuple[str, ...]) -> None:
        if annotation is ModelReference:
            found.append((path, keywords))
            return
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            literals = tuple(
                value
                for arg in args
                if typing.get_origin(arg) is typing.Literal
                for value in typing.get_args(arg)
            )
            for arg in args:
                walk(arg, path, literals)
        elif origin in (list, tuple):
            walk(args[0], (*path, "*"), ())
        elif origin is dict:
            walk(args[1], (*path, "*"), ())
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for name, field in annotation.model_fields.items():
                walk(field.annotation, (*path, name), ())

    walk(MergeConfiguration, (), ())
    return found


@dataclass(frozen=True)
class ModelName:
    """One model named in a mergekit config: `org/base@rev+path/to/lora` is two of these."""

    loc: Loc  # where it is written; a LoRA adapter adds "lora" to its model's key path
    text: str  # the name, without `@revision`
    revision: str  # "@rev" or ""
    tokenizer: bool  # a tokenizer source, not merged weights
    lora: bool  # a LoRA adapter, applied to the model written before its `+`


def model_names(config: dict) -> list[ModelName]:
    """Every model a raw mergekit config names, in mergekit's syntax: `model`, `model@revision`,
    `model+lora`, or the mapping form `{model: ..., lora: ...}`."""
    found: dict[Loc, ModelName] = {}  # by key path: two of mergekit's types may reach one place

    def add(name: ModelName) -> None:
        found.setdefault(name.loc, name)

    for pattern, keywords in reference_positions():
        tokenizer = pattern[0].startswith("tokenizer")
        for loc, value in _matches(config, pattern):
            if isinstance(value, str) and value not in keywords:
                base, plus, adapter = value.partition("+")
                add(ModelName(loc, *_split_revision(base), tokenizer, False))
                if plus:
                    add(ModelName((*loc, "lora"), *_split_revision(adapter), tokenizer, True))
            elif isinstance(value, dict):  # ModelReference as a mapping: {model: ..., lora: ...}
                for part in ("model", "lora"):
                    text = value.get(part)
                    text = text.get("path") if isinstance(text, dict) else text
                    if isinstance(text, str):
                        add(ModelName((*loc, part), text, "", tokenizer, part == "lora"))
    return list(found.values())


def with_locations(config: dict, location: Callable[[ModelName], str]) -> dict:
    """A copy of a raw mergekit config with every model name replaced by `location(name)`."""
    import copy

    config = copy.deepcopy(config)
    names = {name.loc: name for name in model_names(config)}
    for pattern, _ in reference_positions():
        for loc, value in _matches(config, pattern):
            parent = _get(config, loc[:-1])
            if isinstance(value, str) and loc in names:
                text = location(names[loc]) + names[loc].revision
                if (*loc, "lora") in names:
                    adapter = names[(*loc, "lora")]
                    text += "+" + location(adapter) + adapter.revision
                parent[loc[-1]] = text
            elif isinstance(value, dict):
                for part in ("model", "lora"):
                    name = names.get((*loc, part))
                    if name is None:
                        continue
                    if isinstance(value[part], dict):
                        value[part]["path"] = location(name)
                    else:
                        value[part] = location(name)
    return config


def _split_revision(text: str) -> tuple[str, str]:
    name, at, revision = text.partition("@")
    return name, at + revision


def _matches(data: Any, pattern: tuple[str, ...], loc: Loc = ()) -> Iterator[tuple[Loc, Any]]:
    """(key path, value) of every place in `data` that `pattern` describes."""
    if not pattern:
        yield loc, data
        return
    head, rest = pattern[0], pattern[1:]
    if head == "*":
        items = (
            enumerate(data)
            if isinstance(data, list)
            else (data.items() if isinstance(data, dict) else ())
        )
        for key, value in items:
            yield from _matches(value, rest, (*loc, key))
    elif isinstance(data, dict) and head in data and data[head] is not None:
        yield from _matches(data[head], rest, (*loc, head))


def _get(data: Any, loc: Loc) -> Any:
    for key in loc:
        data = data[key]
    return data


# Keys model cards' configs carry that mergekit's MergeConfiguration has not (options of its
# commands, mergekit-multi's document name), with what a recipe writes instead.
NOT_CONFIG_KEYS = {
    "name": "a mergekit-multi document's name: in a recipe the stage's own name (its key under "
    "`stages:`) is what other stages name it by; remove this key",
    "trust_remote_code": "a mergekit option: write `trust_remote_code: true` at the recipe's top "
    "level instead",
    "random_seed": "a mergekit option: the recipe's top-level `seed:` is mergekit's random seed",
    "clone_tensors": "a mergekit option upstack sets itself when a slice repeats a layer; remove it",
    "copy_tokenizer": "a mergekit option upstack always sets; remove it",
    "lora_merge_cache": "a mergekit option upstack sets itself (.upstack/work/<stage>/); remove it",
    "write_model_card": "a mergekit option: the push stage writes the model card; remove it",
}


def instead_problem(config: dict) -> Problem | None:
    """A key of a raw mergekit config that mergekit does not take where it is written, and what
    to write instead: a model's `revision:` beside it (mergekit reads `name@revision`), a
    `layer_range` in `models:` (a slice's), an option of mergekit's commands. mergekit's models
    ignore unknown keys; upstack refuses them, and here says what works."""
    for key in config:
        if key in NOT_CONFIG_KEYS:
            return (key,), NOT_CONFIG_KEYS[key]
    return _misplaced(config, ())


def _misplaced(data: Any, loc: Loc) -> Problem | None:
    if isinstance(data, list):
        return next((p for i, item in enumerate(data) if (p := _misplaced(item, (*loc, i)))), None)
    if not isinstance(data, dict):
        return None
    model, revision = data.get("model"), data.get("revision")
    if "revision" in data and isinstance(model, str):
        return (*loc, "revision"), (
            f"mergekit reads a model's revision from its name: write `model: {model}@{revision}` "
            "and drop this key"
        )
    if "revision" in data and isinstance(model, dict):
        return (*loc, "revision"), (
            f"mergekit reads a model's revision from its mapping: write `model: {{path: "
            f"{model.get('path')}, revision: {revision}}}` and drop this key"
        )
    if "layer_range" in data and len(loc) >= 2 and loc[-2] == "models":
        return (*loc, "layer_range"), (
            "a layer range is a slice's: write `slices: [{sources: [{model: ..., layer_range: "
            "[first, end]}, ...]}]` instead of `models:`"
        )
    # parameters hold values, not models: nothing there is misplaced in this sense
    items = ((key, value) for key, value in data.items() if key != "parameters")
    return next((p for key, value in items if (p := _misplaced(value, (*loc, key)))), None)


def validation_problem(err: ValidationError, raw: Any) -> Problem:
    """pydantic's error that got deepest into `raw`, at its key path (union members' names,
    which pydantic puts in its paths, are not keys of the YAML and are dropped)."""
    best: Problem | None = None
    for error in err.errors():
        loc = _data_path(error["loc"], raw)
        if best is None or len(loc) > len(best[0]):
            best = (loc, error["msg"].removeprefix("Value error, "))
    return best or ((), str(err).splitlines()[0])


def _data_path(loc: tuple, raw: Any) -> Loc:
    out, node = [], raw
    for i, key in enumerate(loc):
        is_key = isinstance(node, dict) and key in node
        if is_key or (isinstance(node, list) and isinstance(key, int) and key < len(node)):
            node = node[key]
        elif isinstance(node, dict) and i == len(loc) - 1:
            node = None  # a missing key: kept, it is where the error is
        else:
            continue  # a union member's name between two keys
        out.append(key)
    return tuple(out)


# --------------------------------------------------------------------------- methods and parameters


def merge_method(name: str):
    from mergekit.merge_methods import registry

    methods = {method.spec.name: method for method in registry.registered_methods()}
    if name not in methods:
        known_methods = ", ".join(sorted(methods))
        return None, (
            ("merge_method",),
            f"unknown merge method '{name}' (mergekit has: {known_methods})",
        )
    return methods[name], None


def inputs_problem(config: Any, method: Any) -> tuple[tuple, str] | None:
    """Base model, input counts and slice lengths, per output slice as mergekit plans them."""
    from mergekit.merge_methods.base import BasePolicy

    name, contract = method.spec.name, method.spec.contract
    for _, _, slices in output_slices(config, ["default"]).values():
        for out in slices:
            base = out.base or config.base_model
            where = out.inputs_loc
            base_loc = ("base_model",) if out.base is None else (*where[:-1], "base_model")
            if contract.base == BasePolicy.REQUIRED and base is None:
                return ("base_model",), f"merge_method '{name}' needs a base_model"
            if contract.base == BasePolicy.FORBIDDEN and base is not None:
                return base_loc, f"merge_method '{name}' takes no base_model"
            added = config.models and base is not None and out.sources[-1].loc is None
            try:
                method.validate_inputs([s.model for s in out.sources], base)
            except ValueError as err:
                note = " (base_model counts as an input)" if added else ""
                return where, f"merge_method '{name}': {err}{note}"
            lengths = {s.layer_range[1] - s.layer_range[0] for s in out.sources if s.layer_range}
            if len(lengths) > 1:
                return (
                    where,
                    f"every source of a slice needs as many layers (here {sorted(lengths)})",
                )
            for j, source in enumerate(out.sources):
                first, end = source.layer_range or (0, 1)
                if not 0 <= first < end:
                    return (
                        *where,
                        j,
                        "layer_range",
                    ), f"needs 0 <= first < end, got [{first}, {end}]"
    return None


def parameters_problem(config: Any, method: Any) -> tuple[tuple, str] | None:
    """Every parameter is one the method takes (or a note, when another method takes it), at a
    level where mergekit reads it, with values of its type; required ones are given."""
    from mergekit.merge_methods.base import ParameterScope

    name = method.spec.name
    known = {p.name: p for p in method.spec.parameters}
    every_method = _all_parameter_names()
    takes = ", ".join(known) or "no parameters"
    for loc, settings, per_input in parameter_blocks(config):
        for key, setting in (settings or {}).items():
            if key not in known:
                if key in every_method:
                    # mergekit ignores a parameter its method does not take, and its own configs
                    # give some (`weight` to sce): a note when the merge runs, not an error
                    continue
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                return (*loc, key), f"unknown parameter '{key}' for {name} (takes: {takes}){hint}"
            parameter = known[key]
            if per_input and parameter.scope == ParameterScope.SHARED:
                return (
                    *loc,
                    key,
                ), f"'{key}' applies to the whole {name} merge: set it under parameters"
            for inside, leaf in _leaves(setting):
                try:
                    parameter.validate(leaf)
                except (ValueError, TypeError) as err:
                    reason = err.errors()[0]["msg"] if isinstance(err, ValidationError) else err
                    return (
                        *loc,
                        key,
                        *inside,
                    ), f"not a valid value for {name}'s '{key}' ({leaf!r}): {reason}"

    shared_blocks = [s for loc, s, per_input in parameter_blocks(config) if not per_input]
    for parameter in method.spec.parameters:
        if not parameter.required:
            continue
        if parameter.scope == ParameterScope.SHARED:
            if not any(parameter.name in (s or {}) for s in shared_blocks):
                return ("parameters", parameter.name), f"required by merge_method '{name}'"
            continue
        for module_params, _, slices in output_slices(config, ["default"]).values():
            for out in slices:
                base = out.base or config.base_model
                around = [out.parameters, module_params, config.parameters]
                for source in out.sources:
                    if parameter.scope == ParameterScope.NON_BASE and source.model == base:
                        continue
                    if any(parameter.name in (s or {}) for s in [source.parameters, *around]):
                        continue
                    if source.loc is None:
                        return ("base_model",), (
                            f"'{source.model}' is merged too and needs '{parameter.name}': list it "
                            f"under models with one, or set parameters.{parameter.name}"
                        )
                    every = " but the base" if parameter.scope == ParameterScope.NON_BASE else ""
                    return (*source.loc, parameter.name), (
                        f"required by merge_method '{name}' for every model{every}"
                    )
    return None


def _all_parameter_names() -> set[str]:
    from mergekit.merge_methods import registry

    return {p.name for m in registry.registered_methods() for p in m.spec.parameters}


def parameter_blocks(config: Any) -> list[tuple[tuple, dict | None, bool]]:
    """(key path, parameters, given per input) of every `parameters:` the config has."""
    blocks = [(("parameters",), config.parameters, False)]
    for module_params, module_loc, slices in output_slices(config, ["default"]).values():
        if module_loc is not None:
            blocks.append((module_loc, module_params, False))
        for out in slices:
            if out.loc is not None:
                blocks.append((out.loc, out.parameters, False))
            blocks += [(s.loc, s.parameters, True) for s in out.sources if s.loc is not None]
    return blocks


def _leaves(setting: Any) -> list[tuple[tuple, Any]]:
    """Every plain value of a parameter setting, with its key path below the parameter: a value,
    a gradient's points, a filter list's values."""
    if isinstance(setting, list):
        return [
            ((i, *inside), leaf) for i, item in enumerate(setting) for inside, leaf in _leaves(item)
        ]
    if hasattr(setting, "value"):  # mergekit's ConditionalParameter: {filter, value}
        return [(("value", *inside), leaf) for inside, leaf in _leaves(setting.value)]
    return [((), setting)]


def ignored_parameters(config: Any) -> list[str]:
    """Parameters the method does not take but another method does, which mergekit ignores."""
    method, _ = merge_method(config.merge_method)
    known = {p.name for p in method.spec.parameters}
    return [
        f"{KeyPath((*loc, key))}: {method.spec.name} takes no '{key}'; mergekit ignores it"
        for loc, settings, _ in parameter_blocks(config)
        for key in (settings or {})
        if key not in known
    ]


# --------------------------------------------------------------------------- parameters per tensor


@dataclass
class Source:
    """One input of an output slice, as mergekit plans it."""

    model: Any  # mergekit ModelReference
    layer_range: tuple[int, int] | None  # None: every layer (the `models:` form)
    parameters: dict | None
    loc: Loc | None  # where its `parameters` are written; None for a base mergekit adds itself


@dataclass
class OutputSlice:
    sources: list[Source]
    base: Any  # ModelReference or None
    parameters: dict | None
    loc: Loc | None  # where its `parameters` are written (the `slices:` form only)
    inputs_loc: Loc  # where its inputs are listed: `models`, or `slices.<i>.sources`


def output_slices(
    config: Any, modules: list[str]
) -> dict[str, tuple[dict | None, Loc | None, list[OutputSlice]]]:
    """Per module: (module parameters, their key path, output slices), the way mergekit's
    MergePlanner.normalize_config lays out the `models:`, `slices:` and `modules:` forms."""
    base = config.base_model

    def from_models(models: list, prefix: Loc) -> list[OutputSlice]:
        sources = [
            Source(m.model, None, m.parameters, (*prefix, i, "parameters"))
            for i, m in enumerate(models)
        ]
        if base is not None and all(m.model != base for m in models):
            sources.append(Source(base, None, None, None))  # mergekit merges the base too
        return [OutputSlice(sources, None, None, None, prefix)]

    def from_slices(slices: list, prefix: Loc) -> list[OutputSlice]:
        return [
            OutputSlice(
                [
                    Source(
                        s.model,
                        tuple(s.layer_range),
                        s.parameters,
                        (*prefix, i, "sources", j, "parameters"),
                    )
                    for j, s in enumerate(out.sources)
                ],
                out.base_model,
                out.parameters,
                (*prefix, i, "parameters"),
                (*prefix, i, "sources"),
            )
            for i, out in enumerate(slices)
        ]

    if config.models:
        return {name: (None, None, from_models(config.models, ("models",))) for name in modules}
    if config.slices:
        return {modules[0]: (None, None, from_slices(config.slices, ("slices",)))}
    laid_out = {}
    for name, module in (config.modules or {}).items():
        prefix = ("modules", name)
        slices = (
            from_models(module.models, (*prefix, "models"))
            if module.models
            else from_slices(module.slices or [], (*prefix, "slices"))
        )
        laid_out[name] = (module.parameters, (*prefix, "parameters"), slices)
    return laid_out


def tensor_parameter_problem(
    config: Any, method: Any, model_config: Callable[[Any], Any]
) -> Problem | None:
    """Evaluate every parameter of `method`, filter lists and gradients included, for every
    tensor mergekit will merge, as mergekit's planner will (mergekit's own evaluate_setting, the
    same precedence, tensor names and gradient positions t). `model_config(model)` is a model's
    transformers config (from its config.json, or built from what the recipe says it will be);
    when one is unknown (a Hub model not in the cache), nothing is checked: mergekit checks at run.

    Finds what mergekit only finds while merging: a value that fails the parameter's type at
    some position of a gradient, and a filter list that leaves some tensor without a required
    value (no fallback entry)."""
    from mergekit.architecture import arch_info_for_config
    from mergekit.merge_methods.base import ParameterScope

    referenced = config.referenced_models()
    configs = {}
    for model in referenced:
        configs[model] = model_config(model)
        if configs[model] is None:
            return None
    first = config.base_model or referenced[0]
    arch = arch_info_for_config(configs[first])
    if arch is None:
        return None  # mergekit has no definition for it: it says so itself when it runs

    def weights(model: Any, module: str, index: int | None, where: str = "layer") -> list:
        definition = arch.modules[module]
        architecture, prefix = definition.architecture, definition.weight_prefix or ""
        if where == "pre":
            found = architecture.pre_weights(configs[model])
        elif where == "post":
            found = architecture.post_weights(configs[model])
        else:
            found = architecture.layer_weights(index, configs[model])
        return [w.model_copy(update={"name": prefix + w.name}) for w in found]

    seen: set[str] = set()  # every tensor name a filter may match
    blocks: list[tuple[Loc | None, dict | None]] = [(("parameters",), config.parameters)]

    def check(weight: Any, names_in: list[str], out: OutputSlice, module: tuple, t: float):
        seen.update([weight.name, *names_in])
        base = out.base or config.base_model
        shared_scopes = [
            (out.parameters, out.loc),
            module[:2],
            (config.parameters, ("parameters",)),
        ]
        for parameter in method.spec.parameters:
            if parameter.scope == ParameterScope.SHARED:
                problem = _resolve(parameter, shared_scopes, weight.name, t, weight.optional, None)
                if problem:
                    return problem
                continue
            for source, name_in in zip(out.sources, names_in, strict=True):
                if source.model == base and parameter.scope == ParameterScope.NON_BASE:
                    continue
                scopes = [(source.parameters, source.loc), *shared_scopes]
                problem = _resolve(parameter, scopes, name_in, t, weight.optional, source)
                if problem:
                    return problem
        return None

    modules = list(arch.modules)
    for module_name, (module_params, module_loc, slices) in output_slices(config, modules).items():
        module = (module_params, module_loc, module_name)
        architecture = arch.modules[module_name].architecture
        blocks.append((module_loc, module_params))
        for out in slices:
            blocks += [(out.loc, out.parameters), *((s.loc, s.parameters) for s in out.sources)]
        for weight in weights(slices[0].sources[0].model, module_name, None, "pre"):
            names = [weight.name] * len(slices[0].sources)
            problem = check(weight, names, slices[0], module, 0)
            if problem:
                return problem
        out_index = 0
        for out in slices:
            ranges = [
                s.layer_range or (0, architecture.num_layers(configs[s.model])) for s in out.sources
            ]
            length = ranges[0][1] - ranges[0][0]
            for offset in range(length):
                t = offset / (length - 1) if length > 1 else 1  # mergekit's gradient position
                outs = weights(first, module_name, out_index)
                ins = [
                    weights(s.model, module_name, r[0] + offset)
                    for s, r in zip(out.sources, ranges, strict=True)
                ]
                for k, weight in enumerate(outs):
                    problem = check(weight, [w[k].name for w in ins], out, module, t)
                    if problem:
                        return problem
                out_index += 1
        for weight in weights(slices[-1].sources[0].model, module_name, None, "post"):
            names = [weight.name] * len(slices[-1].sources)
            problem = check(weight, names, slices[-1], module, 0)
            if problem:
                return problem
    return _unmatched_filter(blocks, seen, configs[first].architectures[0])


def _unmatched_filter(blocks: list, seen: set[str], architecture: str) -> Problem | None:
    """A filter that is in no tensor name never applies: mergekit silently uses the fallback."""
    for loc, settings in blocks:
        for key, setting in (settings or {}).items() if loc is not None else ():
            for k, entry in enumerate(setting if isinstance(setting, list) else [setting]):
                pattern = getattr(entry, "filter", None)
                if pattern in (None, "*") or any(pattern in name for name in seen):
                    continue
                example = next((n for n in sorted(seen) if ".layers.0." in n), min(seen))
                return (*loc, key, *((k,) if isinstance(setting, list) else ()), "filter"), (
                    f"'{pattern}' is in no tensor name of this {architecture} merge, so it never "
                    f"applies (tensors are named like {example})"
                )
    return None


def _resolve(parameter, scopes, tensor: str, t: float, optional: bool, source) -> Problem | None:
    """mergekit's resolve_parameter, one scope at a time, so a problem has its key path."""
    from mergekit.config import evaluate_setting

    written = None
    for settings, loc in scopes:
        if not settings or parameter.name not in settings or loc is None:
            continue
        written = written or (*loc, parameter.name)
        try:
            value = evaluate_setting(
                tensor, settings[parameter.name], t, validate=parameter.validate
            )
        except (ValueError, TypeError, RuntimeError) as err:  # pydantic's ValidationError included
            reason = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
            return (*loc, parameter.name), (
                f"not a valid '{parameter.name}' for tensor {tensor} at gradient position "
                f"t={t:.3g}: {reason}"
            )
        if value is not None:
            return None
    if not parameter.required or optional:
        return None
    of = f" of {source.model}" if source is not None else ""
    if written is None:
        where = (
            ("parameters", parameter.name)
            if source is None or source.loc is None
            else (*source.loc, parameter.name)
        )
        return where, f"no '{parameter.name}' for tensor {tensor}{of}"
    return written, (
        f"no '{parameter.name}' for tensor {tensor}{of}: no filter of this list matches it; "
        "add a last entry without a filter, e.g. {value: ...}"
    )


# --------------------------------------------------------------------------- architectures


def model_problem(ref, recipe) -> str | None:
    """Why mergekit cannot read the model `ref` names, known at load before any weight is: a
    multimodal wrapper (upstack.models.checkpoints.wrapper_problem), a PEER model (mergekit has
    no definition of its branches: upstack.models.peer), or a tied head
    (tie_word_embeddings) where mergekit's definition of the architecture requires an lm_head
    tensor of its own, which a tied checkpoint does not hold (Phi-4-mini: mergekit would stop
    with "lm_head.weight required but not present" in the middle of the merge). Read from the
    config.json of a path or cached Hub model, or the shape the recipe gives a stage."""
    from upstack.models import peer
    from upstack.models.checkpoints import config_json, wrapper_problem
    from upstack.models.shapes import planned_shape

    if ref is None:
        return None
    config = config_json(ref)
    problem = wrapper_problem(config)
    if problem:
        return problem
    if ref.origin == "stage":
        config = planned_shape(recipe, ref, frozenset(recipe.stages))
    problem = peer.refused(config, peer.NO_MERGEKIT, ref.text)
    if problem:
        return problem
    if not config or not config.get("tie_word_embeddings"):
        return None  # untied (or not known offline): mergekit finds every tensor it names
    from upstack.models.mergekit_facts import untied_heads

    architecture = (config.get("architectures") or [""])[0]
    head = untied_heads().get(architecture)
    if head is None:
        return None
    return (
        f"{architecture} with tie_word_embeddings: mergekit's definition of it requires a "
        f"{head} tensor of its own, which a tied checkpoint does not hold; untie the head "
        "first (save the model with tie_word_embeddings: false, lm_head a copy of the embeddings)"
    )


def model_config(ref, recipe) -> Any:
    """A model's transformers config without loading it: its config.json, the shape the recipe
    gives a stage, or a Hub model's cached config.json; None when none is at hand."""
    from upstack.models.shapes import planned_shape

    if ref is None:
        return None
    if ref.origin == "path":
        return config_from_dir(ref.location)
    if ref.origin == "stage":
        return config_from_shape(planned_shape(recipe, ref, frozenset(recipe.stages)))
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref.location, "config.json")
    return config_from_dir(str(Path(cached).parent)) if isinstance(cached, str) else None


def config_source(ref, recipe) -> Any:
    """What `model_config` builds a model's config from, as JSON (a check's verdict is kept under
    it): the config.json text of a path or a cached Hub model, the planned shape of a stage."""
    from upstack.models.shapes import planned_shape

    if ref is None:
        return None
    if ref.origin == "stage":
        return planned_shape(recipe, ref, frozenset(recipe.stages))
    if ref.origin == "path":
        file = Path(ref.location, "config.json")
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref.location, "config.json")
        if not isinstance(cached, str):
            return None
        file = Path(cached)
    try:
        return file.read_text()
    except OSError:
        return None


def config_from_shape(shape: dict | None) -> Any:
    """A transformers config with a planned model's architecture and sizes: enough for mergekit
    to name its tensors, before the model exists. None when the shape does not say."""
    if not shape or not shape.get("model_type") or not shape.get("architectures"):
        return None
    from transformers import AutoConfig

    from upstack.models.shapes import SHAPE_KEYS

    # sizes name the tensors of each layer; a tied head means no lm_head tensor
    keys = (*SHAPE_KEYS, "tie_word_embeddings")
    sizes = {key: shape[key] for key in keys if shape.get(key) is not None}
    try:
        config = AutoConfig.for_model(shape["model_type"], **sizes)
    except ValueError:
        return None  # a model type this transformers does not know
    config.architectures = list(shape["architectures"])
    return config


def config_from_dir(location: str) -> Any:
    """A local model's transformers config, or None when it has none we can read."""
    from transformers import AutoConfig

    if not Path(location, "config.json").is_file():
        return None
    try:
        return AutoConfig.from_pretrained(location)
    except (OSError, ValueError):
        return None
