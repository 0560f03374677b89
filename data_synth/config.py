"""How data_synth's settings are declared: strict pydantic models, and marks on the fields that name a
model or a data set, so a caller (upstack, say) can find those names and resolve them to paths."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

# Where a named model or data set may live. "any": a name the caller resolves (an upstack stage),
# a local path or a Hub id; "local": a caller-resolved name or a local path, never the Hub;
# "path", "hub", "stage": only that.
Where = Literal["any", "local", "path", "hub", "stage"]
# What the named thing is for. Only "train" data counts as a model's training data (on a card,
# say); "eval" data is held out: evaluation sets, and the sets seeds are decontaminated against.
Use = Literal["weights", "tokenizer", "teacher", "train", "eval", "publish"]


class Strict(BaseModel):
    """Every settings model: an unknown key is an error, not a silently ignored typo, and a
    number is finite (a NaN or infinite setting is never what anyone meant)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


def names(
    thing: Literal["model", "data"],
    where: Where = "any",
    *,
    kinds: tuple[str, ...] = (),
    keywords: tuple[str, ...] = (),
) -> dict[str, Any]:
    """`json_schema_extra` of a field whose value (or each value of its list) names a model or a
    data set. `kinds`: the caller's stage kinds it may name (default: any of that thing);
    `keywords`: values that are settings, not names (mergekit's tokenizer_source `union`)."""
    return {"names": {"thing": thing, "where": where, "kinds": kinds, "keywords": keywords}}


def used_for(use: Use) -> dict[str, Any]:
    """`json_schema_extra` of a field: every name inside it is used for `use` (default: a named
    model is `weights`, a named data set is `train`)."""
    return {"use": use}


def key_path(loc: tuple, raw: Any) -> tuple:
    """pydantic's error location as the settings' key path: the names a union adds (`openai`
    in teacher.openai.base_urls, `int` in num_fewshot.int) are not keys of the settings."""
    out, node = [], raw
    for i, key in enumerate(loc):
        rest = loc[i + 1 :]
        if (isinstance(node, dict) and key in node) or (
            isinstance(node, list) and isinstance(key, int) and key < len(node)
        ):
            node = node[key]
        elif isinstance(node, dict) and rest and (rest[0] in node or key in node.values()):
            continue  # a union member's name (`kind: openai` picked it) between two keys
        elif isinstance(node, list) and isinstance(key, str):
            continue  # a union member's name (`list[Expert]`) before a list's index
        elif node is not None and not isinstance(node, dict | list):
            break  # below a plain value: only union members' names
        else:
            node = None  # a key the settings do not have (a missing one): kept as it is
        out.append(key)
    return tuple(out)
