"""synth stage: Synth.Math-Instruct: seeds -> teacher rephrasings (MetaMath style) -> cache -> math-verify -> records.jsonl."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path
from string import Template
from typing import Literal

from pydantic import Field

from data_synth.seeds import Problem, SeedSource, load_problems
from data_synth.teachers import (
    ScriptedTeacher,
    TeacherSpec,
    TransformersTeacher,
    VllmTeacher,
    teacher_model,
)
from upstack.errors import UserError
from upstack.recipe import StageSpec, Strict

PROMPTS = Path(__file__).parent / "prompts"
RECORDS = "records.jsonl"
CACHE = "requests.sqlite"  # in the stage's work dir: survives a crash, unlike out_dir

Augmentation = Literal[
    "rephrase_question", "rephrase_answer", "answer_augmentation", "fobar", "self_verification"
]


class Augmentations(Strict):
    """Samples per seed for each MetaMath augmentation (0 turns one off).

    SOLAR's Synth.Math-Alignment needs rephrase_question and rephrase_answer; the rest are
    MetaMath's extra instruct data: fresh solutions (answer_augmentation), and backward questions
    that hide a number as X and give the answer (fobar: a fixed template; self_verification: the
    teacher restates question and answer as one statement).
    """

    rephrase_question: int = Field(1, ge=0)
    rephrase_answer: int = Field(1, ge=0)
    answer_augmentation: int = Field(0, ge=0)
    fobar: int = Field(0, ge=0)
    self_verification: int = Field(0, ge=0)


class Sampling(Strict):
    temperature: float = Field(0.7, ge=0, description="for rephrasings; MetaMath samples at 0.7")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(1024, ge=1)
    solve_temperature: float = Field(
        0.0, ge=0, description="for solving a rephrased question: greedy checks best"
    )


class Decontaminate(Strict):
    """Drop seeds whose question shares too many word n-grams with an eval question."""

    against: list[SeedSource] = Field(
        default_factory=list, description="the eval sets, as seed sources"
    )
    ngram: int = Field(13, ge=1, description="words per n-gram (13, as in GPT-3's decontamination)")
    threshold: float = Field(
        0.5, gt=0, le=1, description="drop when this share of a seed's n-grams is in an eval set"
    )


class Spec(StageSpec):
    kind: Literal["synth"] = "synth"
    seeds: list[SeedSource] = Field(min_length=1)
    teacher: TeacherSpec
    augmentations: Augmentations = Field(default_factory=Augmentations)
    sampling: Sampling = Field(default_factory=Sampling)
    decontaminate: Decontaminate = Field(default_factory=Decontaminate)

    def refs(self) -> dict[str, str]:
        refs = {}
        for i, source in enumerate(self.seeds):
            refs.update({f"seeds.{i}.{k}": v for k, v in source.refs().items()})
        for i, source in enumerate(self.decontaminate.against):
            refs.update({f"decontaminate.against.{i}.{k}": v for k, v in source.refs().items()})
        if isinstance(self.teacher, VllmTeacher | TransformersTeacher):
            refs["teacher.model"] = self.teacher.model  # a local model: a stage or a path
        return refs


def run(spec: Spec, ctx) -> dict:
    from tqdm import tqdm

    from data_synth.cache import Cache
    from upstack.tables import markdown_table

    dropped: Counter[str] = Counter()
    seeds = _dedupe_seeds(_load(spec.seeds, ctx), dropped)
    seeds = _decontaminate(seeds, spec.decontaminate, ctx, dropped)
    if isinstance(spec.teacher, ScriptedTeacher):
        if any(p.source != "arith" for p in seeds):
            raise UserError(
                f"stages.{ctx.name}.teacher: the scripted teacher only knows `arith` seeds"
            )
        if spec.augmentations.fobar or spec.augmentations.self_verification:
            raise UserError(
                f"stages.{ctx.name}.augmentations: the scripted teacher cannot do fobar or "
                "self_verification; set them to 0"
            )
    ctx.log(f"{len(seeds)} seeds after dedup and decontamination ({dict(dropped)} dropped)")

    cache = Cache(ctx.work_dir / CACHE)
    stats = Counter()
    first = [r for p in seeds for r in _first_round(p, spec, ctx.seed)]
    bar = tqdm(total=len(first), unit="req", desc="synth", dynamic_ncols=True, mininterval=0.5)
    try:
        replies = _ask(first, spec, cache, ctx, bar, stats, dropped)
        records, second = _judge_first(first, replies, spec, ctx.seed, dropped)
        bar.total += len(second)
        replies.update(_ask([item[0] for item in second], spec, cache, ctx, bar, stats, dropped))
        records += _judge_second(second, replies, spec, dropped)
    finally:
        bar.close()
        cache.close()

    records = _dedupe_records(records, seeds, dropped)
    with (ctx.out_dir / RECORDS).open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    kept = Counter(r["augmentation"] for r in records)
    ctx.log(
        "summary\n"
        + markdown_table(
            ["augmentation", "kept"],
            [[a, n] for a, n in sorted(kept.items())] + [["total", len(records)]],
        )
    )
    ctx.log("dropped\n" + markdown_table(["reason", "count"], sorted(dropped.items())))
    return {
        "seeds": len(seeds),
        "requests": stats["requests"],
        "requests_sent": stats["sent"],
        "cache_hits": stats["cache_hits"],
        "retries": stats["retries"],
        "kept": len(records),
        "kept_by_augmentation": dict(sorted(kept.items())),
        "dropped": dict(sorted(dropped.items())),
        "teacher": spec.teacher.kind,
        "model": teacher_model(spec.teacher),
    }


# --------------------------------------------------------------------------- seeds


def _load(sources: list[SeedSource], ctx) -> list[Problem]:
    return [p for source in sources for p in load_problems(source, ctx.seed, ctx.model_path)]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _dedupe_seeds(problems: list[Problem], dropped: Counter) -> list[Problem]:
    seen, out = set(), []
    for problem in problems:
        key = " ".join(_words(problem.question))
        if key in seen:
            dropped["duplicate_seed"] += 1
            continue
        seen.add(key)
        out.append(problem)
    return out


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _words(text)
    if len(words) < n:
        return {tuple(words)} if words else set()  # a short question counts as one n-gram
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _decontaminate(
    seeds: list[Problem], spec: Decontaminate, ctx, dropped: Counter
) -> list[Problem]:
    if not spec.against:
        return seeds
    banned: set[tuple[str, ...]] = set()
    for problem in _load(spec.against, ctx):
        banned |= ngrams(problem.question, spec.ngram)
    kept = []
    for problem in seeds:
        grams = ngrams(problem.question, spec.ngram)
        if grams and len(grams & banned) / len(grams) >= spec.threshold:
            dropped["contaminated"] += 1
            continue
        kept.append(problem)
    return kept


# --------------------------------------------------------------------------- requests


def _prompt(name: str, **slots: str) -> list[dict[str, str]]:
    text = Template((PROMPTS / f"{name}.txt").read_text()).substitute(slots).strip()
    return [{"role": "user", "content": text}]


def _request(
    task: str, messages: list[dict], sample: int, temperature: float, problem: Problem, spec: Spec
):
    from data_synth.cache import request_key
    from data_synth.teachers import Request

    sampling = {
        "temperature": temperature,
        "top_p": spec.sampling.top_p,
        "max_tokens": spec.sampling.max_tokens,
    }
    key = request_key(spec.teacher.kind, teacher_model(spec.teacher), messages, sampling, sample)
    return Request(
        key=key, task=task, messages=messages, sampling=sampling, sample=sample, problem=problem
    )


def _mask_number(problem: Problem, seed: int) -> tuple[str, str] | None:
    """The question with one number replaced by X, and that number: what a backward question asks for."""
    numbers = list(re.finditer(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", problem.question))
    if not numbers:
        return None
    hit = random.Random(f"{seed}:{problem.id}").choice(numbers)
    return problem.question[: hit.start()] + "X" + problem.question[hit.end() :], hit.group()


def _first_round(problem: Problem, spec: Spec, seed: int) -> list:
    """Requests that need only the seed. Questions they produce are solved in the second round."""
    aug, temperature = spec.augmentations, spec.sampling.temperature
    out = []
    for i in range(aug.rephrase_question):
        out.append(
            _request(
                "rephrase_question",
                _prompt("rephrase_question", question=problem.question),
                i,
                temperature,
                problem,
                spec,
            )
        )
    for i in range(aug.rephrase_answer):
        messages = _prompt("rephrase_answer", question=problem.question, solution=problem.solution)
        out.append(_request("rephrase_answer", messages, i, temperature, problem, spec))
    for i in range(aug.answer_augmentation):
        out.append(
            _request(
                "answer_augmentation",
                _prompt("solve", question=problem.question),
                i,
                temperature,
                problem,
                spec,
            )
        )
    masked = _mask_number(problem, seed) if aug.self_verification else None
    for i in range(aug.self_verification if masked else 0):
        messages = _prompt("self_verification", question=masked[0], answer=problem.answer)
        out.append(_request("self_verification", messages, i, temperature, problem, spec))
    return out


def _ask(requests: list, spec: Spec, cache, ctx, bar, stats: Counter, dropped: Counter) -> dict:
    """key -> reply text (None if it failed) for every request: from the cache, else from the teacher."""
    from data_synth.teachers import stream

    unique = list({r.key: r for r in requests}.values())
    replies: dict[str, str | None] = cache.get_many([r.key for r in unique])
    stats["requests"] += len(unique)
    stats["cache_hits"] += len(replies)
    bar.update(len(requests) - len(unique) + len(replies))
    todo = [r for r in unique if r.key not in replies]

    async def drive() -> None:
        async for request, reply in stream(spec.teacher, todo, ctx):
            stats["sent"] += 1
            stats["retries"] += reply.retries
            if reply.text is not None:
                cache.put(request.key, request.task, request.messages, reply.text, reply.retries)
            else:
                stats["failed"] += 1
            replies[request.key] = reply.text
            bar.update(1)
            bar.set_postfix(
                cached=stats["cache_hits"],
                retries=stats["retries"],
                failed=stats["failed"],
                refresh=False,
            )

    if todo:
        asyncio.run(drive())
    return replies


# --------------------------------------------------------------------------- verification


def _record(
    problem: Problem,
    augmentation: str,
    sample: int,
    question: str,
    answer: str,
    gold: str,
    answer_key: str,
    spec: Spec,
    question_key: str | None = None,
) -> dict:
    return {
        "id": f"{problem.id}:{augmentation}:{sample}",
        "seed_id": problem.id,
        "source": problem.source,
        "augmentation": augmentation,
        "sample": sample,
        "question": question,
        "answer": answer.strip(),
        "gold": gold,
        "original_question": problem.question,
        "original_solution": problem.solution,
        "teacher": spec.teacher.kind,
        "model": teacher_model(spec.teacher),
        "request_hash": answer_key,
        "question_request_hash": question_key,
    }


def _judge_first(
    requests: list, replies: dict, spec: Spec, seed: int, dropped: Counter
) -> tuple[list[dict], list[tuple]]:
    """Keep verified answers; turn each usable new question into a `solve` request for round two.

    Round two items: (solve request, seed problem, augmentation, sample, question, gold, question key).
    """
    from data_synth.verify import check

    records, questions = [], []
    for request in requests:
        problem, text = request.problem, replies.get(request.key)
        if text is None:
            dropped["request_failed"] += 1
            continue
        if request.task in ("rephrase_answer", "answer_augmentation"):
            reason = check(problem.answer, text)
            if reason:
                dropped[reason] += 1
                continue
            records.append(
                _record(
                    problem,
                    request.task,
                    request.sample,
                    problem.question,
                    text,
                    problem.answer,
                    request.key,
                    spec,
                )
            )
            continue
        question = text.strip()
        if not question:
            dropped["empty"] += 1
        elif _words(question) == _words(problem.question):
            dropped["unchanged_question"] += (
                1  # a "rephrasing" that says the same thing adds nothing
            )
        else:
            gold = (
                problem.answer
                if request.task == "rephrase_question"
                else _mask_number(problem, seed)[1]
            )
            questions.append((problem, request.task, request.sample, question, gold, request.key))

    # FOBAR's backward question comes from a fixed template, not from the teacher.
    for problem in (
        {r.problem.id: r.problem for r in requests}.values() if spec.augmentations.fobar else []
    ):
        masked = _mask_number(problem, seed)
        if masked is None:
            dropped["no_number_to_mask"] += spec.augmentations.fobar
            continue
        question = (
            Template((PROMPTS / "fobar.txt").read_text())
            .substitute(question=masked[0], answer=problem.answer)
            .strip()
        )
        questions += [
            (problem, "fobar", i, question, masked[1], None)
            for i in range(spec.augmentations.fobar)
        ]

    # Sample index = the augmentation's sample, so two fobar samples are two solves of one question.
    solve = [
        (
            _request(
                "solve",
                _prompt("solve", question=q),
                sample if task == "fobar" else 0,
                spec.sampling.solve_temperature if task != "fobar" else spec.sampling.temperature,
                problem,
                spec,
            ),
            problem,
            task,
            sample,
            q,
            gold,
            key,
        )
        for problem, task, sample, q, gold, key in questions
    ]
    return records, solve


def _judge_second(solve: list[tuple], replies: dict, spec: Spec, dropped: Counter) -> list[dict]:
    """A new question is kept only if the teacher's own solution of it reaches the gold answer."""
    from data_synth.verify import check

    records = []
    for request, problem, task, sample, question, gold, question_key in solve:
        text = replies.get(request.key)
        if text is None:
            dropped["request_failed"] += 1
            continue
        reason = check(gold, text)
        if reason:
            dropped[reason] += 1
            continue
        records.append(
            _record(problem, task, sample, question, text, gold, request.key, spec, question_key)
        )
    return records


def _dedupe_records(records: list[dict], seeds: list[Problem], dropped: Counter) -> list[dict]:
    """One record per (augmentation, question, answer), in seed order, then augmentation, then sample:
    the same file whatever order the replies came back in."""
    position = {p.id: i for i, p in enumerate(seeds)}
    order = {a: i for i, a in enumerate(Augmentations.model_fields)}
    records = sorted(
        records, key=lambda r: (position[r["seed_id"]], order[r["augmentation"]], r["sample"])
    )
    seen, out = set(), []
    for record in records:
        key = hashlib.sha256(
            json.dumps(
                [record["augmentation"], _words(record["question"]), _words(record["answer"])]
            ).encode()
        ).digest()
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        out.append(record)
    return out
