"""Every teacher request and its reply in one SQLite file, so a killed synth run resumes without redoing any."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
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

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)  # autocommit: each INSERT commits
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, task TEXT, messages TEXT, "
            "reply TEXT NOT NULL, retries INTEGER, created REAL)"
        )

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
