"""What load-time checks need from slow-to-import libraries, kept between runs.

Some checks ask a library that takes seconds to import (mergekit pulls in peft, torch and
bitsandbytes: ~9 s on a laptop core; TRL ~5 s) for an answer that changes only when its inputs
do. Two kinds of answer are kept under the user's cache dir:
- facts about a library version (TRL's config fields, where mergekit's config holds models),
  keyed by the library's version: `library_facts`;
- checks that passed (a merge config valid for its models' architecture), keyed by everything
  the verdict depends on: the check, its inputs as written (the config, the models' config.json
  or planned shapes), the versions of the libraries it asked, and upstack's own source, so a
  changed check is a new check: `passed` / `remember`. Only passes are kept: a failing check
  runs every time and says what is wrong.

A read-only or full cache dir only costs the import next time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

UPSTACK_SOURCE = Path(__file__).parent.parent  # the whole package


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "upstack"


def library_facts(library: str, topic: str, compute: Callable[[], Any]) -> Any:
    """`compute()` (JSON-able, imports `library`) once per version of `library`."""
    cache = cache_dir() / f"{library}-{metadata.version(library)}-{topic}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    facts = compute()
    _write(cache, json.dumps(facts))
    return facts


def passed(check: str, inputs: Any, libraries: tuple[str, ...]) -> bool:
    """Whether `check` passed before on these inputs with these library versions."""
    return _verdict_file(check, inputs, libraries).is_file()


def remember(check: str, inputs: Any, libraries: tuple[str, ...]) -> None:
    """Record that `check` passed on these inputs; call only after it did."""
    _write(_verdict_file(check, inputs, libraries), "")


def _verdict_file(check: str, inputs: Any, libraries: tuple[str, ...]) -> Path:
    versions = {name: metadata.version(name) for name in libraries}
    text = json.dumps([check, inputs, versions, _source_fingerprint()], sort_keys=True, default=str)
    return cache_dir() / "passed" / hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def _source_fingerprint() -> list:
    """upstack's modules by size and modification time: editing a check forgets its verdicts."""
    return sorted(
        (str(path.relative_to(UPSTACK_SOURCE)), stat.st_size, stat.st_mtime_ns)
        for path in UPSTACK_SOURCE.rglob("*.py")
        for stat in [path.stat()]
    )


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        partial.replace(path)  # atomic: a concurrent reader sees all of it or nothing
    except OSError:
        pass
