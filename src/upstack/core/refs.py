"""References to models and data sets: found in a stage's settings by their declaration
(data_synth.config.names), resolved once at load into a stage of the recipe, a local path or a
Hub id, so no caller guesses again what a name is."""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from upstack.core import registry
from upstack.core.errors import looks_like_secret
from upstack.core.keys import KeyPath

Origin = Literal["stage", "path", "hub"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A name that says it is a local path even before it exists (a preflight then says it is missing).
LOOKS_LOCAL = re.compile(r"^[./~]|\.(jsonl?|parquet|csv|txt|ya?ml|safetensors)$")
# A path on a Windows machine, such as a model card's author's: a drive (`G:\models\x`, `C:/x`)
# or a backslash anywhere (`\\host\x`, `models\x`).
WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]|\\")
DEFAULT_USE = {"model": "weights", "data": "train"}
BEST = ".best"  # `<sweep>.best`: the variant of a sweep that its eval scored best


@dataclass(frozen=True)
class Reference:
    """One name in a stage's settings, resolved."""

    key: str  # key path inside the stage, as `--set` writes it: "models.0.model"
    text: str  # as written in the recipe
    thing: Literal["model", "data"]
    use: str  # weights, tokenizer, teacher, train, eval, publish (data_synth.config.Use)
    origin: Origin
    location: str  # what to load: the stage's output dir, the local path, or the Hub id
    kind: str | None = None  # the stage kind, when origin is "stage"
    stage: str | None = None  # the stage, when origin is "stage" (`soup.best` names stage soup)

    @property
    def loc(self) -> KeyPath:
        """The key path as a tuple of keys, for errors: ("models", 0, "model")."""
        return KeyPath.of(self.key)


@dataclass(frozen=True)
class Declared:
    """A name found in the settings, before it is resolved."""

    key: tuple[str | int, ...]
    text: str
    thing: Literal["model", "data"]
    where: str
    use: str
    kinds: tuple[str, ...]


def declared(spec: BaseModel) -> list[Declared]:
    """Every name a validated stage spec holds, with its key path, what it names and its use."""
    found: list[Declared] = []

    def walk(value: Any, loc: tuple, names: dict | None, use: str | None) -> None:
        if isinstance(value, BaseModel):
            for field_name, info in type(value).model_fields.items():
                extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
                # a field's `names` mark covers its value (each item of a list), not deeper models
                walk(
                    getattr(value, field_name),
                    (*loc, field_name),
                    extra.get("names"),
                    extra.get("use", use),
                )
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                walk(item, (*loc, i), names, use)
        elif isinstance(value, str) and names and value not in names["keywords"]:
            thing = names["thing"]
            found.append(
                Declared(
                    loc, value, thing, names["where"], use or DEFAULT_USE[thing], names["kinds"]
                )
            )

    walk(spec, (), None, None)
    # settings that are another library's, not upstack fields (a merge's mergekit config), say
    # themselves what they name
    own = getattr(spec, "declared_names", None)
    return found + (own() if callable(own) else [])


def resolve(
    name: Declared, stages: dict[str, str], out_dir: Path, sweeps: Collection[str] = ()
) -> Reference:
    """The reference `name` makes, given the recipe's stages (name -> kind) and its sweeps. Raises
    ValueError with the message for the user when it names nothing it may name."""
    key = str(KeyPath(name.key))
    text, where = name.text, name.where

    def made(origin: Origin, location: str, kind: str | None = None) -> Reference:
        stage = (text.removesuffix(BEST) if text.endswith(BEST) else text) if kind else None
        return Reference(key, text, name.thing, name.use, origin, location, kind, stage)

    may_be_stage = where in ("any", "local", "stage")
    if may_be_stage and text in sweeps and name.thing == "model":
        # the sweep stage is the pick; its name alone reads as "all of them" (eval lists it so)
        raise ValueError(
            f"'{text}' is a sweep of several merges: take '{text}{BEST}' (the variant its eval "
            "scores best), or name one variant"
        )
    if may_be_stage and text.endswith(BEST) and text.removesuffix(BEST) in sweeps:
        stage = text.removesuffix(BEST)
        return made("stage", str(out_dir / stage), stages[stage])
    if text in stages and may_be_stage:
        kind = stages[text]
        if name.kinds:
            fits = kind in name.kinds
        else:  # a model must come from a stage that makes one, data from one that writes data
            fits = registry.known(kind) and registry.kind(kind).output == name.thing
        if not fits:
            allowed = name.kinds or registry.kinds_making(name.thing)
            what = " or ".join(name.kinds) if name.kinds else f"{name.thing} ({', '.join(allowed)})"
            article = "an" if what[0] in "aeiou" else "a"
            raise ValueError(f"'{text}' is a stage of kind {kind}, not {article} {what} stage")
        return made("stage", str(out_dir / text), kind)
    if where == "stage":
        raise ValueError(f"no stage '{text}'{_did_you_mean(text, stages)}")
    if where == "hub":
        if HUB_ID.match(text):
            return made("hub", text)
        raise ValueError(f"'{text}' is not a Hub id (org/name)")
    path = Path(text).expanduser()
    if path.exists() or where == "path" or LOOKS_LOCAL.search(text):
        return made("path", str(path))
    if where == "any" and HUB_ID.match(text):
        return made("hub", text)
    if where == "local":
        return made("path", str(path))  # the stage's preflight says it is missing
    if looks_like_secret(text):
        shown = "the value (it looks like a secret: not shown)"
    elif WINDOWS_PATH.search(text):
        shown = f"'{text}' is a Windows path, so it"
    else:
        shown = f"'{text}'"
    # a near stage name is most likely what was meant; else the name is to be replaced
    hint = _did_you_mean(text, stages) or ": replace it with one"
    raise ValueError(
        f"{shown} is not a stage of this recipe, an existing path, or a Hub id (org/name){hint}"
    )


def _did_you_mean(text: str, stages: dict[str, str]) -> str:
    close = difflib.get_close_matches(text, list(stages), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
