"""A recipe's output directory: where every file of a run goes, and what state each stage is in.

    <output_dir>/
      <stage>/                  a finished stage: its outputs, and upstack.json written last
      .tmp-<stage>-<pid>/       a stage being written; renamed to <stage>/ when it finishes
      .work/<stage>/            kept across attempts: checkpoints, request caches, failed.json
      .lock                     one run at a time

This module is the only one that knows these names: everything else asks a RunDir.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from upstack.core.errors import Interrupted, UserError

MANIFEST = "upstack.json"  # written last inside a stage dir: its presence means the stage finished
FAILED = "failed.json"  # in the stage's work dir when its last attempt raised
WORKER_ERROR = ".error.json"  # an accelerate worker's one-line error, for the launcher to print
WORKER_METRICS = ".metrics.json"  # an accelerate worker's metrics, for the launcher's manifest
TRACEBACK = "traceback.txt"  # in the work dir: the last attempt's traceback, when it was not ours
WORK = ".work"
TEMP = ".tmp-"
LOCK = ".lock"

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
        """A stage's finished output."""
        return self.root / name

    def work(self, name: str) -> Path:
        """What a stage keeps across attempts (checkpoints, caches); survives failures."""
        return self.root / WORK / name

    def temp(self, name: str, pid: int | None = None) -> Path:
        """Where a stage writes before its output is swapped in."""
        return self.root / f"{TEMP}{name}-{os.getpid() if pid is None else pid}"

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
        """Write the manifest last, then swap the new output in: the old dir (if any) is moved
        aside first, so at every instant the stage dir is either absent or complete."""
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
        for leftover in self.root.glob(f"{TEMP}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    # ----------------------------------------------------------------------- one run at a time

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One run per output dir: a second one would race on the same temp and stage dirs."""
        handle = (self.root / LOCK).open("a+")
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
        if not (self.root / LOCK).is_file():
            return False
        with self.lock():
            return False
