"""How stage settings are declared: strict models, marks on the fields that name models and data
sets, the fields every stage has, and the error a validator raises about one key.

One vocabulary with data_synth (whose settings models the synth and pairs stages take as they
are): `Strict`, `names(...)`, `used_for(...)` are its own. A settings model whose data comes from
the tiny world's generators says so with `GENERATED: ClassVar[bool] = True`; a stage whose
settings hold one hashes the generators' code (upstack.core.hashing)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from data_synth.config import Strict, names, used_for
from upstack.core.keys import KeyPath

__all__ = [
    "STAGE_NAME",
    "StageSpec",
    "Strict",
    "added",
    "did_you_mean",
    "error_at",
    "names",
    "used_for",
]

# A stage's name is its directory under output_dir and a key `--set stages.<name>.x` reaches:
# nothing that could leave that directory (/, ..), nothing a shell or a key path splits on.
STAGE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,127}$")


class StageSpec(Strict):
    """Fields every stage has. Each stage kind's module subclasses this as `Spec`.

    A field that names a model or a data set says so (`json_schema_extra=names("model")`): the
    recipe resolves every such name at load (upstack.core.refs), and a name that is a stage
    makes that stage a dependency.
    """

    kind: str
    after: list[str] = Field(
        default_factory=list, description="stages to finish first, beyond the ones this stage reads"
    )

    @field_validator("after")
    @classmethod
    def _known_stages(cls, after: list[str], info: ValidationInfo) -> list[str]:
        stages = (info.context or {}).get("stages")  # stage name -> kind, when loading a recipe
        for i, name in enumerate(after if stages is not None else []):
            if name not in stages:
                raise error_at((i,), f"no stage '{name}'{did_you_mean(name, list(stages))}")
        return after


def added(**extra) -> dict:
    """`json_schema_extra` of a setting added after stages were hashed with the settings before
    it: it enters a stage's hash only when set away from its default (upstack.core.hashing), so
    adding it makes no finished stage stale."""
    return {"added": True, **extra}


def error_at(loc: Iterable[str | int] | str, message: str) -> ValidationError:
    """For a model validator whose check concerns one key: the error placed at that key path
    (relative to the model), so the load error names that key and its line."""
    error = PydanticCustomError("recipe", "{message}", {"message": message})
    return ValidationError.from_exception_data(
        "recipe", [InitErrorDetails(type=error, loc=tuple(KeyPath.of(loc)), input={})]
    )


def did_you_mean(word: str, known: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
