"""synth stage: Synth.Math-Instruct from data_synth: seeds -> teacher rephrasings -> math-verify -> records.jsonl."""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from typing import Literal

from data_synth import DataSynthError, SynthConfig
from data_synth.teachers import OpenAITeacher, VllmTeacher
from upstack.recipe import StageSpec

RECORDS = "records.jsonl"
CACHE = "requests.sqlite"  # in the stage's work dir: survives a crash, unlike out_dir


class Spec(StageSpec, SynthConfig):
    """data_synth's settings as they are (seeds, teacher, augmentations, sampling, decontaminate)."""

    kind: Literal["synth"] = "synth"


def preflight(spec: Spec, ctx) -> None:
    """Before the run starts (not hours in, after the stages planned before this one), fail on what
    can be known now: a teacher that cannot start here, a missing API key, a broken seed file."""
    from data_synth.seeds import JsonlSeeds, load_problems
    from data_synth.teachers import VLLM_MISSING

    teacher = spec.teacher
    if isinstance(teacher, VllmTeacher) and importlib.util.find_spec("vllm") is None:
        raise ctx.fail("teacher.kind", VLLM_MISSING)
    if (
        isinstance(teacher, OpenAITeacher)
        and teacher.api_key_env
        and not os.environ.get(teacher.api_key_env)
    ):
        raise ctx.fail(
            "teacher.api_key_env", f"environment variable {teacher.api_key_env} is not set"
        )
    sources = [("seeds", spec.seeds), ("decontaminate.against", spec.decontaminate.against)]
    for key, group in sources:
        for i, source in enumerate(group):
            if isinstance(source, JsonlSeeds) and not ctx.is_pending(ctx.ref(f"{key}.{i}.path")):
                try:  # a bad line fails now, naming the file and the line
                    load_problems(source, ctx.seed, ctx.location)
                except DataSynthError as err:
                    raise ctx.fail(f"{key}.{i}.{err.setting or 'path'}", str(err)) from None


def run(spec: Spec, ctx) -> dict:
    from data_synth import synthesize
    from data_synth.files import write_jsonl
    from upstack.tables import markdown_table

    try:
        result = synthesize(
            spec,
            seed=ctx.seed,
            cache_path=ctx.work_dir / CACHE,
            resolve=ctx.location,
            trust_remote_code=ctx.recipe.trust_remote_code,
            log=ctx.log,
        )
    except DataSynthError as err:
        raise ctx.fail(err.setting or "", str(err)) from None
    write_jsonl(ctx.out_dir / RECORDS, result.records)

    kept = Counter(r["augmentation"] for r in result.records)
    rows = [[a, n] for a, n in sorted(kept.items())] + [["total", len(result.records)]]
    ctx.log("kept\n" + markdown_table(["augmentation", "records"], rows))
    dropped = sorted(result.tally.dropped.items())
    ctx.log("dropped\n" + markdown_table(["reason", "count"], dropped))
    if result.tally.failed:  # failed for good, after retries: asked again on the next run
        failed = result.tally.failed.most_common()
        ctx.log("failed requests\n" + markdown_table(["error", "count"], failed))
    return result.metrics()
