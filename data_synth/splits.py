"""The splits of the generated tasks (arith, listops), by problem identity.

A problem is its kind and its numbers or arguments, whatever the wording or the seed; a hash of
that identity puts it in one split for good, so no eval problem is trained on and no synth seed
is an SFT problem under another wording. Eval keeps the same tenth it always had.
"""

from __future__ import annotations

import hashlib

# first byte of the identity's hash: [0, 26) eval, [26, 77) synth seeds, [77, 256) train
BANDS = (("eval", 0.1), ("synth", 0.3), ("train", 1.0))  # cumulative shares
SPLITS = tuple(name for name, _ in BANDS)


def split_of(identity: str) -> str:
    byte = hashlib.sha256(identity.encode()).digest()[0]
    return next(name for name, upto in BANDS if byte < 256 * upto)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
