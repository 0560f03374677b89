"""synth stage: Synth.Math-Instruct from data_synth: seeds -> teacher rephrasings -> math-verify -> records.jsonl."""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from typing import Literal

from data_synth import DataSynthError, SynthConfig
from data_synth.teachers import OpenAITeacher, TransformersTeacher, VllmTeacher
from upstack.core.errors import StageFailed
from upstack.core.settings import StageSpec

# The stage contract (upstack.core.contract)
OUTPUT = "data"  # records.jsonl: pairs reads it
LAYER_MAP = "none"
LAUNCHABLE = False

RECORDS = "records.jsonl"
CACHE = "requests.sqlite"  # in the stage's work dir: survives a crash, unlike out_dir
FAILED_REQUESTS = "failed_requests.json"  # in the work dir, after a run that lost too many


class Spec(StageSpec, SynthConfig):
    """data_synth's settings as they are (seeds, teacher, augmentations, sampling, decontaminate)."""

    kind: Literal["synth"] = "synth"


def check_at_load(spec: Spec, recipe, name: str) -> None:
    """A vllm teacher that is a PEER model (upscale method peer) is refused: vLLM has no class
    for it. Read from its config.json, or the shape the recipe gives a stage."""
    from upstack.models import peer
    from upstack.models.checkpoints import config_json
    from upstack.models.shapes import planned_shape

    if not isinstance(spec.teacher, VllmTeacher):
        return
    for ref in recipe.refs(name):
        if ref.thing != "model":
            continue
        if ref.origin == "stage":
            config = planned_shape(recipe, ref, frozenset(recipe.stages))
        else:
            config = config_json(ref)
        problem = peer.refused(config, peer.NO_VLLM, ref.text)
        if problem:
            raise recipe.error(("stages", name, *ref.loc), problem)


def preflight(spec: Spec, ctx) -> None:
    """Before the run starts (not hours in, after the stages planned before this one), fail on what
    can be known now: a teacher that cannot start here, a missing API key, a broken seed file."""
    from data_synth.seeds import JsonlSeeds, load_problems
    from data_synth.teachers import VLLM_MISSING
    from upstack.models.checkpoints import check_model

    teacher = spec.teacher
    if isinstance(teacher, VllmTeacher) and importlib.util.find_spec("vllm") is None:
        raise ctx.fail("teacher.kind", VLLM_MISSING)
    for ref in ctx.refs():
        if ref.thing == "model":  # a local teacher's weights
            check_model(ctx, ref.key, tokenizer=True)
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


def plan(spec: Spec, ctx) -> dict:
    """Requests to the teacher and tokens it may generate, before the run: per seed, round one
    asks rephrase_question + rephrase_answer + answer_augmentation + self_verification, round two
    solves what round one wrote (at most rephrase_question + self_verification) and fobar +
    new_numbers questions; each answer is at most `sampling.max_tokens`. Seeds are counted
    where known offline (generated seeds, `limit`, a local file's lines), before deduplication
    and decontamination remove some: the counts are upper bounds."""
    from pathlib import Path

    aug = spec.augmentations
    first = aug.rephrase_question + aug.rephrase_answer + aug.answer_augmentation
    first += aug.self_verification
    second = aug.rephrase_question + aug.self_verification + aug.fobar + aug.new_numbers
    seeds: int | None = 0
    for source in spec.seeds:
        count = getattr(source, "count", None) or getattr(source, "limit", None)
        if count is None and getattr(source, "source", None) == "jsonl":
            file = Path(ctx.location(source.path))
            if file.is_file():
                with file.open("rb") as lines:
                    count = sum(1 for line in lines if line.strip())
        if count is None or seeds is None:
            seeds = None
        else:
            seeds += count
    out = {
        "stage": ctx.name,
        "kind": spec.kind,
        "requests_per_seed": first + second,
        "max_tokens": spec.sampling.max_tokens,
        "seeds": seeds,
    }
    if seeds is not None:
        out["requests"] = seeds * (first + second)
        out["tokens_to_generate"] = out["requests"] * spec.sampling.max_tokens
    else:
        out["notes"] = ["seeds unknown before the run (a Hub data set: set limit)"]
    return out


def run(spec: Spec, ctx) -> dict:
    import json

    from data_synth import synthesize
    from data_synth.errors import SynthFailed
    from data_synth.files import write_jsonl

    (ctx.work_dir / FAILED_REQUESTS).unlink(missing_ok=True)
    if isinstance(spec.teacher, TransformersTeacher):
        from upstack.models import peer

        peer.register()  # a PEER teacher loads by upstack's classes, as every stage loads it
    try:
        result = synthesize(
            spec,
            seed=ctx.seed,
            cache_path=ctx.work_dir / CACHE,
            resolve=ctx.location,
            trust_remote_code=ctx.recipe.trust_remote_code,
            allow_pickle=ctx.recipe.allow_pickle,
            log=ctx.log,
        )
    except SynthFailed as err:
        # the stage fails (nothing of it counts as done); what it got stays in the cache and
        # what it lost is written beside it, for the user and for the rerun's comparison
        _log_tables(err.result, ctx)
        metrics = err.result.metrics()
        (ctx.work_dir / FAILED_REQUESTS).write_text(json.dumps(metrics, indent=2) + "\n")
        raise ctx.fail("teacher", str(err), error=StageFailed) from None
    except DataSynthError as err:
        raise ctx.fail(err.setting or "", str(err)) from None
    write_jsonl(ctx.out_dir / RECORDS, result.records)
    _log_tables(result, ctx)
    return result.metrics()


def _log_tables(result, ctx) -> None:
    from upstack.core.tables import markdown_table

    kept = Counter(r["augmentation"] for r in result.records)
    rows = [[a, n] for a, n in sorted(kept.items())] + [["total", len(result.records)]]
    ctx.log("kept\n" + markdown_table(["augmentation", "records"], rows))
    dropped = sorted(result.tally.dropped.items())
    ctx.log("dropped\n" + markdown_table(["reason", "count"], dropped))
    if result.tally.failed:  # failed for good, after retries: asked again on the next run
        failed = result.tally.failed.most_common()
        ctx.log("failed requests\n" + markdown_table(["error", "count"], failed))
