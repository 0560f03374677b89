"""A recipe's output directory: where every file of a run goes, what state each stage is in, and
what upstack may replace there.

    <output_dir>/
      <stage>/                  a finished stage: its outputs, and upstack.json written last
      report.md, eval-*.png ... the report (`upstack report`), `upstack mixture fit`'s files
      .upstack/
        recipe.json             whose output dir this is: one recipe's
        written.json            the report files upstack wrote, by content hash
        lock                    one run at a time
        tmp/<stage>-<pid>/      a stage being written; renamed to <stage>/ when it finishes
        work/<stage>/           kept across attempts: checkpoints, request caches, failed.json,
                                library.log, traceback.txt

This module is the only one that knows these names: everything else asks a RunDir. upstack
replaces or deletes only what it wrote: a stage dir whose manifest names this recipe, a report
file whose content is what upstack last wrote there, and anything under `.upstack/`. Every path
is computed here from names that cannot leave the directory (a stage name is an identifier).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from upstack.core.errors import Interrupted, UserError
from upstack.core.settings import STAGE_NAME

MANIFEST = "upstack.json"  # written last inside a stage dir: its presence means the stage finished
FAILED = "failed.json"  # in the stage's work dir when its last attempt raised
WORKER_ERROR = ".error.json"  # an accelerate worker's one-line error, for the launcher to print
WORKER_METRICS = ".metrics.json"  # an accelerate worker's metrics, for the launcher's manifest
TRACEBACK = "traceback.txt"  # in the work dir: the last attempt's traceback, when it was not ours
INTERNAL = ".upstack"  # everything upstack keeps for itself
OWNER = "recipe.json"
WRITTEN = "written.json"
LOCK = "lock"

State = Literal["done", "stale", "failed", "interrupted", "missing"]


def read_manifest(stage_dir: Path | str) -> dict[str, Any] | None:
    """The manifest of a finished stage dir (this recipe's or another's), or None."""
    try:
        return json.loads((Path(stage_dir) / MANIFEST).read_text())
    except (OSError, ValueError):  # absent, unreadable, half-written: not a finished stage
        return None


@dataclass(frozen=True)
class RunDir:
    root: Path

    # ----------------------------------------------------------------------- where things go

    def stage(self, name: str) -> Path:
        """A stage's finished output: a directory right under the root, nowhere else."""
        if not STAGE_NAME.match(name):
            raise ValueError(f"not a stage name: {name!r}")  # load refuses these first
        return self.root / name

    @property
    def internal(self) -> Path:
        return self.root / INTERNAL

    def work(self, name: str) -> Path:
        """What a stage keeps across attempts (checkpoints, caches); survives failures."""
        return self.internal / "work" / self.stage(name).name

    def temp(self, name: str, pid: int | None = None) -> Path:
        """Where a stage writes before its output is swapped in (same file system as the root,
        so the swap is a rename)."""
        return self.internal / "tmp" / f"{self.stage(name).name}-{pid or os.getpid()}"

    def file(self, name: str) -> Path:
        """A report file at the root (report.md, eval-<stage>.png): a name, never a path."""
        if "/" in name or name.startswith(".") or STAGE_NAME.match(name):
            raise ValueError(f"not a report file name: {name!r}")
        return self.root / name

    # ----------------------------------------------------------------------- state

    def manifest(self, name: str) -> dict[str, Any] | None:
        return read_manifest(self.stage(name))

    def state(self, name: str, expected_hash: str) -> State:
        """done (its manifest has this hash), stale (another hash), failed (its last attempt
        raised), interrupted (Ctrl-C, SIGTERM), missing."""
        manifest = self.manifest(name)
        if manifest is not None:
            return "done" if manifest.get("config_hash") == expected_hash else "stale"
        try:
            failed = json.loads((self.work(name) / FAILED).read_text())
        except (OSError, ValueError):
            return "missing"
        return "interrupted" if failed.get("interrupted") else "failed"

    def mark_failed(self, name: str, error: BaseException) -> None:
        interrupted = isinstance(error, KeyboardInterrupt | Interrupted)
        with suppress(OSError):  # a full disk must not hide the error that filled it
            (self.work(name) / FAILED).write_text(
                json.dumps(
                    {
                        "error": f"{type(error).__name__}: {error}",
                        "interrupted": interrupted,
                        "at": dt.datetime.now(dt.timezone.utc).isoformat(),
                    }
                )
            )

    # ----------------------------------------------------------------------- whose it is

    def owner(self) -> str | None:
        """The recipe whose output dir this is, or None (a new dir, or not upstack's)."""
        try:
            return json.loads((self.internal / OWNER).read_text())["recipe"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def not_ours(self, recipe: str, names: list[str]) -> list[tuple[str, str]]:
        """(stage, why) for each of `names` whose dir exists but was not written by upstack for
        `recipe`: a run would replace it, so it must refuse instead."""
        found = []
        for name in names:
            path = self.stage(name)
            if not path.exists() and not path.is_symlink():
                continue
            manifest = self.manifest(name) if path.is_dir() and not path.is_symlink() else None
            if manifest is None:
                found.append((name, f"{path} exists and upstack did not write it"))
            elif manifest.get("recipe") != recipe:
                found.append(
                    (name, f"{path} is stage '{name}' of recipe '{manifest.get('recipe')}'")
                )
        return found

    def claim(self, recipe: str) -> None:
        """Mark the output dir as this recipe's (after `check_owner` passed)."""
        self.internal.mkdir(parents=True, exist_ok=True)
        if self.owner() != recipe:
            (self.internal / OWNER).write_text(json.dumps({"recipe": recipe}) + "\n")

    def check_owner(self, recipe: str) -> str | None:
        """Why `recipe` may not use this output dir, or None: another recipe's runs are there."""
        owner = self.owner()
        if owner is not None and owner != recipe:
            return (
                f"{self.root} holds the runs of recipe '{owner}'; give recipe '{recipe}' its "
                "own output_dir (two recipes in one dir would replace each other's stages)"
            )
        return None

    # ----------------------------------------------------------------------- writing a stage

    def begin(self, name: str) -> Path:
        """A fresh temp dir for the stage, its work dir made, its failed mark cleared."""
        tmp = self.temp(name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.work(name).mkdir(parents=True, exist_ok=True)
        (self.work(name) / FAILED).unlink(missing_ok=True)
        return tmp

    def finish(self, name: str, tmp: Path, manifest: dict[str, Any]) -> None:
        """Write the manifest last, then swap the new output in: the old dir (if any, and only
        ours: `not_ours` was asked before the run) is moved aside first, so at every instant
        the stage dir is either absent or complete."""
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        final, old = self.stage(name), self.temp(f"{name}-old")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def abandon(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def clear_leftovers(self) -> None:
        """Temp dirs of a run that was killed: never read as finished, removed here."""
        shutil.rmtree(self.internal / "tmp", ignore_errors=True)

    # ----------------------------------------------------------------------- report files

    def write_files(self, files: dict[str, bytes]) -> list[Path]:
        """Write report files at the root, all or none: none when a file of one of the names is
        there that upstack did not write (or that was changed since): a user's report.md is
        never overwritten."""
        written = self._written()
        for name in files:
            path = self.file(name)
            if path.exists():
                recorded = written.get(name)
                if recorded is None or recorded != _digest(path.read_bytes()):
                    raise UserError(
                        f"{path} was not written by upstack (or was edited since): move it, and "
                        "upstack will write its own there"
                    )
        self.internal.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, data in files.items():
            partial = self.internal / f"{name}.{os.getpid()}.tmp"
            partial.write_bytes(data)
            partial.replace(self.file(name))
            written[name] = _digest(data)
            paths.append(self.file(name))
        (self.internal / WRITTEN).write_text(json.dumps(written, indent=1, sort_keys=True))
        return paths

    def written_files(self) -> list[Path]:
        """The report files upstack wrote at the root that are still as it wrote them."""
        return [
            self.root / name
            for name, digest in sorted(self._written().items())
            if (self.root / name).is_file() and _digest((self.root / name).read_bytes()) == digest
        ]

    def _written(self) -> dict[str, str]:
        try:
            return json.loads((self.internal / WRITTEN).read_text())
        except (OSError, ValueError):
            return {}

    # ----------------------------------------------------------------------- one run at a time

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One run per output dir: a second one would race on the same temp and stage dirs."""
        self.internal.mkdir(parents=True, exist_ok=True)
        handle = (self.internal / LOCK).open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(
                f"{self.root}: another upstack run is using this output dir (pid {holder}); "
                "wait for it or stop it"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def is_locked(self) -> bool:
        """Whether another run holds the lock now (raises its UserError if so)."""
        if not (self.internal / LOCK).is_file():
            return False
        with self.lock():
            return False


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
