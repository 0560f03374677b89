"""What a stage's `preflight(spec, ctx)` and `run(spec, ctx)` get besides its own spec."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upstack.core.errors import UserError
from upstack.core.keys import KeyPath
from upstack.core.recipe import Recipe
from upstack.core.refs import Reference


@dataclass
class StageContext:
    recipe: Recipe
    name: str
    out_dir: Path  # a temporary dir, renamed to the stage dir only if `run` returns
    work_dir: Path  # kept across attempts: checkpoints and request caches live here
    config_hash: str
    pending: frozenset[str] = field(default_factory=frozenset)  # stages this run (re)builds
    # the GPUs and launch a plan is for (upstack.core.hardware.Machine): the `plan` hook's
    machine: Any = None

    @property
    def seed(self) -> int:
        return self.recipe.seed

    def fail(
        self, key: str | tuple = "", message: str = "", error: type[UserError] = UserError
    ) -> UserError:
        """The one-line error for a mistake in this stage's setting `key` (a key path relative to
        the stage, dotted or a tuple; "" for the stage itself): `FILE:LINE: stages.<name>.<key>:
        message`. `error=StageFailed` for a stage that ran but did not do its work (exit 1)."""
        return self.recipe.error(KeyPath(("stages", self.name)) + KeyPath.of(key), message, error)

    def refs(self) -> list[Reference]:
        """The models and data sets this stage names, resolved at load."""
        return self.recipe.refs(self.name)

    def ref(self, key: str) -> Reference:
        """The reference at key path `key` ("model", "models.0.model")."""
        return next(ref for ref in self.refs() if ref.key == key)

    def location(self, text: str) -> str:
        """What to load for a name this stage holds: a stage's output dir, a path or a Hub id.
        For libraries that take a resolve function (data_synth)."""
        return next((ref.location for ref in self.refs() if ref.text == text), text)

    def is_pending(self, ref: Reference) -> bool:
        """True when `ref` names a stage this run builds first: its current output means nothing."""
        return ref.stage is not None and ref.stage in self.pending

    def stage_dir(self, name: str) -> Path:
        """The finished output of another stage of this recipe."""
        return self.recipe.run_dir.stage(name)

    def log(self, message: str) -> None:
        if is_main_process():
            print(f"[{self.name}] {message}", file=sys.stderr, flush=True)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
