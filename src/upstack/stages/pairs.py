"""pairs stage: synth records -> an instruct set and SOLAR's Synth.Math-Alignment DPO tuples (data_synth.pairs).

Output, each a dataset dir that `datasets.load_dataset(dir)` reads as train/test splits:
instruct/{train,test}.jsonl (messages) and alignment/{train,test}.jsonl (prompt/chosen/rejected).
A split with no rows is not written (an empty .jsonl is not a loadable dataset); the manifest
counts say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from data_synth import PairsConfig
from upstack.core.errors import StageFailed
from upstack.core.settings import StageSpec, names

# The stage contract (upstack.core.contract)
OUTPUT = "data"  # instruct and alignment splits: `datasets: [{stage: ...}]` reads them
LAYER_MAP = "none"
LAUNCHABLE = False


class Spec(StageSpec, PairsConfig):
    kind: Literal["pairs"] = "pairs"
    records: str = Field(
        "synth",
        description="the synth stage (or a dir holding records.jsonl)",
        json_schema_extra=names("data", "local", kinds=("synth",)),
    )


def run(spec: Spec, ctx) -> dict:
    from data_synth import DataSynthError, build_pairs, read_records, write_pairs

    try:
        records = read_records(Path(ctx.ref("records").location))
    except DataSynthError as err:
        raise ctx.fail("records", str(err)) from None
    pairs = build_pairs(records, spec, ctx.seed)
    tuples = pairs.counts["alignment_train"] + pairs.counts["alignment_test"]
    wanted = any(r["augmentation"] in ("rephrase_question", "rephrase_answer") for r in records)
    if not any(pairs.counts.values()):
        raise ctx.fail("records", f"no rows: {len(records)} synth records", error=StageFailed)
    if wanted and not tuples:
        # SOLAR's tuple needs a kept rephrased question and a rephrased answer that differs
        why = [f"{pairs.unpaired_seeds} seeds had a rephrased question or answer but not both"]
        why += [f"{n} tuples dropped ({r.replace('_', ' ')})" for r, n in pairs.dropped.items()]
        raise ctx.fail("records", f"no DPO tuples: {'; '.join(why)}", error=StageFailed)
    for empty in write_pairs(pairs, ctx.out_dir):
        ctx.log(f"warning: {empty} is empty (no verified records for it); not written")
    summary = ", ".join(f"{k}={v}" for k, v in pairs.counts.items())
    ctx.log(
        f"{summary}, duplicates dropped={pairs.duplicates}, tuples dropped={dict(pairs.dropped)}"
    )
    return {
        **pairs.counts,
        "seeds": pairs.seeds,
        "test_seeds": pairs.test_seeds,
        "duplicates": pairs.duplicates,
        "tuples_dropped": dict(pairs.dropped),
        "unpaired_seeds": pairs.unpaired_seeds,
    }


def preflight(spec: Spec, ctx) -> None:
    """Records named by path must be there before anything runs."""
    ref = ctx.ref("records")
    if ref.origin == "path" and not Path(ref.location).exists():
        raise ctx.fail("records", f"{ref.location}: no such file or dir (synth's records.jsonl)")
