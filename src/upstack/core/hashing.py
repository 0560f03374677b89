"""Stage hashes: what makes a finished stage stale.

A stage's hash covers its kind, its settings, the recipe seed and the hashes of its inputs, so a
change anywhere upstream makes every stage below it stale before anything reruns. Outside
sources (a Hub id, a local file) enter by name, not content. Generated data enters by the code
that makes it: a stage whose settings hold a settings model marked `GENERATED` (arith or listops
data, the scripted teacher, init's BPE corpus) also hashes data_synth.generated's fingerprint,
so a run kept across an upgrade reruns what the new generators would make differently, and
nothing on a user's own data.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from upstack.core import registry


def stage_hashes(recipe) -> dict[str, str]:
    """Every stage's hash, in dependency order."""
    hashes: dict[str, str] = {}
    for name in recipe.order():
        spec = recipe.stages[name]
        settings = without_added_defaults(spec, registry.kind(spec.kind).settings(spec))
        settings.pop("after", None)  # ordering, not data: it changes no output
        payload = {
            "kind": spec.kind,
            "spec": settings,
            "seed": recipe.seed,
            "inputs": {dep: hashes[dep] for dep in recipe.deps(name)},
        }
        if reads_generated(spec):
            payload["generator"] = generator_fingerprint()
        blob = json.dumps(payload, sort_keys=True).encode()
        hashes[name] = hashlib.sha256(blob).hexdigest()[:16]
    return hashes


def without_added_defaults(model: BaseModel, data: dict) -> dict:
    """`data` (the model's settings as plain data) less every setting marked `added` that is at
    its default, at any depth (upstack.core.settings.added)."""
    out = dict(data)
    for name, info in type(model).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        value = getattr(model, name)
        default = info.get_default(call_default_factory=True)
        if extra.get("added") and value == default:
            out.pop(name, None)
        elif isinstance(value, BaseModel) and isinstance(out.get(name), dict):
            out[name] = without_added_defaults(value, out[name])
        elif isinstance(value, list) and isinstance(out.get(name), list):
            out[name] = [
                without_added_defaults(v, d)
                if isinstance(v, BaseModel) and isinstance(d, dict)
                else d
                for v, d in zip(value, out[name], strict=False)
            ]
    return out


def reads_generated(settings: Any) -> bool:
    """Whether any settings model inside `settings` is marked GENERATED (a class attribute, or a
    property where it depends on the settings)."""
    if isinstance(settings, BaseModel):
        if getattr(settings, "GENERATED", False) is True:
            return True
        return any(reads_generated(getattr(settings, name)) for name in type(settings).model_fields)
    if isinstance(settings, list | tuple):
        return any(reads_generated(item) for item in settings)
    if isinstance(settings, dict):
        return any(reads_generated(item) for item in settings.values())
    return False


def generator_fingerprint() -> str:
    from data_synth.generated import fingerprint

    return fingerprint()
