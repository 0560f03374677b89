"""The tiny world's generated data and the code that makes it.

A caller that caches what it built from generated data (upstack's stages) must know when that
code changed: the same settings then give other data. `fingerprint()` hashes exactly the modules
that decide generated data (the tasks, their splits, the scripted teacher), so editing anything
else here, a real teacher's retry code say, changes nothing. Settings models whose data come
from these generators say so with `GENERATED = True` (a class attribute, or a property when it
depends on the settings).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

GENERATORS = ("arith.py", "listops.py", "splits.py", "scripted.py")


@functools.cache
def fingerprint() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in GENERATORS:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]
