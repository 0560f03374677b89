"""What upstack knows of mergekit without importing it (mergekit pulls in torch and peft: ~5-9 s):
facts read from mergekit's own models once per mergekit version and cached (upstack.core.
check_cache), and the checks of a merge config that need nothing more, so a typo is refused in a
fraction of a second. What needs mergekit itself (values against a method's parameter types,
inputs per output slice) is upstack.models.merging's."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

Loc = tuple  # a key path inside a stage's settings: ("slices", 0, "parameters", "t")
Problem = tuple[Loc, str]  # (key path, message): what a validator turns into one error line


def config_facts() -> dict[str, Any]:
    """What the load-time checks need to know of mergekit, cached per mergekit version so a
    mistake is refused without importing it (mergekit pulls in torch and peft: ~5-9 s):
    `schema`, the shape of MergeConfiguration (its models, their keys, where lists, mappings,
    unions and model references go), and `methods`, every merge method's parameters."""
    from upstack.core.check_cache import library_facts

    return library_facts("mergekit", "config-facts", _config_facts)


def _config_facts() -> dict[str, Any]:
    from mergekit.common import ModelPath, ModelReference
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import registry

    models: dict[str, dict[str, Any]] = {}

    def node(annotation: Any) -> dict[str, Any]:
        annotation = _unwrap(annotation)
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            return {"t": "union", "options": [node(arg) for arg in args]}
        if annotation is type(None):
            return {"t": "none"}
        if annotation in (ModelReference, ModelPath):  # a mapping, or its string form
            return {"t": "reference", "model": annotation.__name__}
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            name = annotation.__name__
            if name not in models:
                models[name] = {}  # placed first: a model that holds itself ends the walk
                models[name].update(
                    {
                        (f.alias or key): node(f.annotation)
                        for key, f in annotation.model_fields.items()
                    }
                )
            return {"t": "model", "model": name}
        if origin in (list, tuple):
            return {"t": "list", "items": [node(arg) for arg in args if arg is not Ellipsis]}
        if origin is dict:
            return {"t": "dict", "value": node(args[1]) if args else {"t": "scalar"}}
        if origin is typing.Literal:
            return {"t": "literal", "values": list(args)}
        return {"t": "scalar"}

    root = node(MergeConfiguration)
    methods = {
        method.spec.name: {
            p.name: {"scope": p.scope.value, "required": p.required} for p in method.spec.parameters
        }
        for method in registry.registered_methods()
    }
    return {"root": root, "models": models, "methods": methods}


def untied_heads() -> dict[str, str]:
    """Architecture name -> the output embedding tensor mergekit's definition of it requires
    (after the layers, indexed by token, neither optional nor tied to the input embedding):
    a checkpoint that ties its head (tie_word_embeddings) does not hold that tensor, so mergekit
    stops when it reads it (Phi-3's definition: Phi-4-mini ties). Cached per mergekit version."""
    from upstack.core.check_cache import library_facts

    return library_facts("mergekit", "untied-heads", _untied_heads)


def _untied_heads() -> dict[str, str]:
    from mergekit.architecture.json_definitions import JSON_ARCHITECTURES

    found: dict[str, str] = {}
    for arch in JSON_ARCHITECTURES:
        for module in arch.modules.values():
            definition = getattr(module.architecture, "definition", None)
            heads = [
                w.name
                for w in getattr(definition, "post_weights", None) or []
                if w.vocabulary_axis is not None
                and w.name.endswith(".weight")
                and not w.optional
                and not w.tied_names
            ]
            for name in arch.architectures if heads else ():
                found.setdefault(name, (module.weight_prefix or "") + heads[0])
    return found


def unknown_key(value: Any, schema: dict, facts: dict, loc: Loc = ()) -> Problem | None:
    """The first key of `value` that mergekit's config (described by `facts`, from
    config_facts) does not have at that place. mergekit's models ignore unknown keys, so a typo
    (`paramters:`, `filer:`) would silently do nothing."""
    kind = schema["t"]
    if kind == "union":
        fitting = [option for option in schema["options"] if _fits(value, option, facts)]
        problems = [unknown_key(value, option, facts, loc) for option in fitting]
        # a value that one member of the union takes as it is has no unknown key
        return None if not problems or None in problems else problems[0]
    if kind in ("model", "reference"):
        if not isinstance(value, dict):
            return None
        fields = facts["models"].get(schema["model"], {})
        for key, item in value.items():
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                return (
                    *loc,
                    key,
                ), f"unknown key (mergekit's {schema['model']} has no such key{hint})"
            problem = unknown_key(item, fields[key], facts, (*loc, key))
            if problem:
                return problem
    elif kind == "list" and isinstance(value, list) and schema["items"]:
        items = schema["items"]
        for i, item in enumerate(value):
            problem = unknown_key(item, items[min(i, len(items) - 1)], facts, (*loc, i))
            if problem:
                return problem
    elif kind == "dict" and isinstance(value, dict):
        for key, item in value.items():
            problem = unknown_key(item, schema["value"], facts, (*loc, key))
            if problem:
                return problem
    return None


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _fits(value: Any, schema: dict, facts: dict) -> bool:
    """Whether `value` has the shape `schema` takes (a mapping for a model, a list of fitting
    items for a list, a plain value for a scalar), before any value is checked."""
    kind = schema["t"]
    if kind == "union":
        return any(_fits(value, option, facts) for option in schema["options"])
    if kind == "none":
        return value is None
    if kind == "reference":  # a model reference also takes its string form, path@revision+lora
        return isinstance(value, dict | str)
    if kind == "model":
        return isinstance(value, dict)
    if kind == "list":
        item = schema["items"][0] if schema["items"] else None
        return isinstance(value, list) and all(
            _fits(v, item, facts) for v in value if item is not None
        )
    if kind == "dict":
        return isinstance(value, dict)
    if kind == "literal":
        return value in schema["values"]
    return not isinstance(value, dict | list)


def quick_problem(raw: dict, upstack_keys: list[str]) -> Problem | None:
    """What the cached facts alone refuse in a merge config: a key mergekit does not have, a
    merge method it does not know, a parameter no method takes. No mergekit import."""
    facts = config_facts()
    top = facts["models"]["MergeConfiguration"]
    for key in raw:
        if key not in top:
            close = difflib.get_close_matches(str(key), [*top, *upstack_keys], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            return (key,), f"unknown key (not upstack's, nor in mergekit's config{hint})"
    problem = unknown_key(raw, facts["root"], facts)
    if problem:
        return problem
    name = raw.get("merge_method")
    if isinstance(name, str) and name not in facts["methods"]:
        known = ", ".join(sorted(facts["methods"]))
        return ("merge_method",), f"unknown merge method '{name}' (mergekit has: {known})"
    takes = facts["methods"].get(name)
    if takes is None:
        return None
    every_method = {p for method in facts["methods"].values() for p in method}
    for loc, settings in _parameter_blocks(raw):
        for key in settings:
            # a parameter another method takes is ignored by mergekit: a note when it runs
            if key not in takes and key not in every_method:
                close = difflib.get_close_matches(str(key), list(takes), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                listed = ", ".join(takes) or "no parameters"
                return (*loc, key), (
                    f"unknown parameter '{key}' for {name} (takes: {listed}){hint}"
                )
    return None


def _parameter_blocks(data: Any, loc: Loc = ()) -> Iterator[tuple[Loc, dict]]:
    """Every `parameters:` mapping in a raw mergekit config, with its key path."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "parameters" and isinstance(value, dict):
                yield (*loc, key), value
            else:
                yield from _parameter_blocks(value, (*loc, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _parameter_blocks(value, (*loc, i))
