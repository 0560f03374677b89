"""Every teacher request and its reply in one SQLite file, so a killed synth run resumes without redoing any."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def request_key(
    teacher_kind: str, model: str, messages: list[dict], sampling: dict[str, Any], sample: int
) -> str:
    """The identity of a request: the same key is the same question to the same teacher."""
    blob = json.dumps(
        [teacher_kind, model, messages, sampling, sample], sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class Cache:
    """key -> reply text. Only finished requests are stored (a failed one is retried next run).

    WAL mode and one commit per reply: a process killed at any instant leaves every reply that
    was committed, and none half-written; synchronous=NORMAL is safe against a process kill
    (only a power cut can lose the last commits, never corrupt the file).
    """

    def __init__(self, path: Path, log: Callable[[str], None] = print):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = self._open(path)
        except sqlite3.DatabaseError as err:
            # a damaged file (a disk that filled, a copy cut short) is set aside, never deleted:
            # the answers in it may be recoverable, and they cost money
            aside = set_aside(path)
            log(f"request cache {path} is damaged ({err}); moved to {aside}, starting a new one")
            self.db = self._open(path)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None)  # autocommit: each INSERT commits
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, task TEXT, "
                "messages TEXT, reply TEXT NOT NULL, retries INTEGER, created REAL)"
            )
            (verdict,) = db.execute("PRAGMA quick_check").fetchone()
            if verdict != "ok":
                raise sqlite3.DatabaseError(verdict)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def get_many(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for start in range(0, len(keys), 500):  # SQLite caps the number of bound parameters
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                self.db.execute(f"SELECT key, reply FROM replies WHERE key IN ({marks})", chunk)
            )
        return found

    def put(self, key: str, task: str, messages: list[dict], reply: str, retries: int) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO replies (key, task, messages, reply, retries, created) VALUES (?, ?, ?, ?, ?, ?)",
            (key, task, json.dumps(messages, ensure_ascii=False), reply, retries, time.time()),
        )

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def set_aside(path: Path) -> Path:
    """Rename a cache file (and its WAL files) to `<name>.damaged-<time>`; returns the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        part = path.with_name(path.name + suffix)
        if part.exists():
            part.rename(aside.with_name(aside.name + suffix))
    return aside
