"""synth stage: Synth.Math-Instruct: seeds -> teacher rephrasings (MetaMath style) -> cache -> math-verify -> records.jsonl."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Literal

from pydantic import Field, model_validator

from data_synth import teachers, verify
from data_synth.cache import Cache, request_key
from data_synth.seeds import ArithSeeds, JsonlSeeds, Problem, SeedSource, load_problems
from data_synth.teachers import (
    OpenAITeacher,
    Request,
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

    @model_validator(mode="after")
    def _scripted_knows_only_arith(self) -> Spec:
        if isinstance(self.teacher, ScriptedTeacher):
            if any(not isinstance(s, ArithSeeds) for s in self.seeds):
                raise ValueError(
                    "the scripted teacher only knows `arith` seeds: use another teacher kind"
                )
            if self.augmentations.fobar or self.augmentations.self_verification:
                raise ValueError(
                    "the scripted teacher cannot do fobar or self_verification: set them to 0"
                )
        return self

    def refs(self) -> dict[str, str]:
        refs = {}
        for i, source in enumerate(self.seeds):
            refs.update({f"seeds.{i}.{k}": v for k, v in source.refs().items()})
        for i, source in enumerate(self.decontaminate.against):
            refs.update({f"decontaminate.against.{i}.{k}": v for k, v in source.refs().items()})
        if isinstance(self.teacher, VllmTeacher | TransformersTeacher):
            refs["teacher.model"] = self.teacher.model  # a local model: a stage or a path
        return refs


def preflight(spec: Spec, recipe, name: str, pending: set[str]) -> None:
    """Before the run starts (not hours in, after the stages planned before this one), fail on what
    can be known now: a teacher that cannot start here, a missing API key, a broken seed file."""
    from upstack.recipe import locate

    teacher = spec.teacher
    if isinstance(teacher, VllmTeacher) and importlib.util.find_spec("vllm") is None:
        raise UserError(
            f"{locate(recipe, 'stages', name, 'teacher', 'kind')}: stages.{name}.teacher.kind: vllm is "
            "not installed here (pip install vllm on a GPU machine), or serve the model with "
            "`vllm serve` and use kind: openai"
        )
    if (
        isinstance(teacher, OpenAITeacher)
        and teacher.api_key_env
        and not os.environ.get(teacher.api_key_env)
    ):
        raise UserError(
            f"{locate(recipe, 'stages', name, 'teacher', 'api_key_env')}: stages.{name}.teacher.api_key_env: "
            f"environment variable {teacher.api_key_env} is not set"
        )
    for source in [*spec.seeds, *spec.decontaminate.against]:
        if isinstance(source, JsonlSeeds) and source.path not in recipe.stages:
            load_problems(source, recipe.seed)  # a bad line is a UserError naming file and line


def run(spec: Spec, ctx) -> dict:
    from tqdm import tqdm

    from upstack.tables import markdown_table

    dropped: Counter[str] = Counter()
    seeds = _dedupe_seeds(_load(spec.seeds, ctx), dropped)
    seeds = _decontaminate(seeds, spec.decontaminate, ctx, dropped)
    ctx.log(f"{len(seeds)} seeds after dedup and decontamination ({dict(dropped)} dropped)")

    # Round one asks what needs only the seed; round two solves the questions round one wrote
    # (and FOBAR's), since a new question is kept only if its solution reaches the gold answer.
    cache, stats, verdicts, errors = Cache(ctx.work_dir / CACHE), Counter(), {}, Counter()
    first = [r for p in seeds for r in _first_round(p, spec, ctx.seed)]
    bar = tqdm(total=len(first), unit="req", desc="synth", dynamic_ncols=True, mininterval=0.5)
    try:
        replies = _ask(first, spec, cache, ctx, bar, stats, verdicts, errors)
        records, questions = _judge_first(first, replies, verdicts, spec, ctx.seed, dropped)
        second = [_solve_request(q, spec) for q in questions]
        bar.total += len(second)
        replies.update(_ask(second, spec, cache, ctx, bar, stats, verdicts, errors))
        records += _judge_second(second, questions, replies, verdicts, spec, dropped)
    finally:
        bar.close()
        cache.close()

    records = _dedupe_records(records, seeds, dropped)
    with (ctx.out_dir / RECORDS).open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    kept = Counter(r["augmentation"] for r in records)
    rows = [[a, n] for a, n in sorted(kept.items())] + [["total", len(records)]]
    ctx.log("kept\n" + markdown_table(["augmentation", "records"], rows))
    ctx.log("dropped\n" + markdown_table(["reason", "count"], sorted(dropped.items())))
    if errors:  # requests that failed for good, after retries: they are retried on the next run
        ctx.log("failed requests\n" + markdown_table(["error", "count"], errors.most_common()))
    return {
        "seeds": len(seeds),
        "requests": stats["requests"],
        "requests_sent": stats["sent"],
        "cache_hits": stats["cache_hits"],
        "retries": stats["retries"],
        "kept": len(records),
        "kept_by_augmentation": dict(sorted(kept.items())),
        "dropped": dict(sorted(dropped.items())),
        "request_errors": dict(errors.most_common()),
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


@dataclass(frozen=True)
class NewQuestion:
    """A question written in round one (or by FOBAR's template), waiting for its solve in round two."""

    problem: Problem
    augmentation: str
    sample: int
    text: str
    gold: str  # the seed's answer, or the masked number for a backward question
    request_key: str | None  # the request that wrote it; None for FOBAR's template


def _request(
    task: str,
    messages: list[dict],
    sample: int,
    temperature: float,
    problem: Problem,
    gold: str | None,
    spec: Spec,
):
    sampling = {
        "temperature": temperature,
        "top_p": spec.sampling.top_p,
        "max_tokens": spec.sampling.max_tokens,
    }
    key = request_key(spec.teacher.kind, teacher_model(spec.teacher), messages, sampling, sample)
    return Request(
        key=key,
        task=task,
        messages=messages,
        sampling=sampling,
        sample=sample,
        problem=problem,
        gold=gold,
    )


def _mask_number(problem: Problem, seed: int) -> tuple[str, str] | None:
    """The question with one number replaced by X, and that number: what a backward question asks."""
    numbers = list(re.finditer(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", problem.question))
    if not numbers:
        return None
    hit = random.Random(f"{seed}:{problem.id}").choice(numbers)
    return problem.question[: hit.start()] + "X" + problem.question[hit.end() :], hit.group()


def _first_round(problem: Problem, spec: Spec, seed: int) -> list[Request]:
    """Requests that need only the seed."""
    aug, temperature, question = spec.augmentations, spec.sampling.temperature, problem.question
    out = []
    for i in range(aug.rephrase_question):
        messages = _prompt("rephrase_question", question=question)
        out.append(_request("rephrase_question", messages, i, temperature, problem, None, spec))
    for i in range(aug.rephrase_answer):
        messages = _prompt("rephrase_answer", question=question, solution=problem.solution)
        out.append(
            _request("rephrase_answer", messages, i, temperature, problem, problem.answer, spec)
        )
    for i in range(aug.answer_augmentation):
        messages = _prompt(
            "solve", question=question
        )  # a fresh solution: the solve prompt, sampled
        out.append(
            _request("answer_augmentation", messages, i, temperature, problem, problem.answer, spec)
        )
    masked = _mask_number(problem, seed) if aug.self_verification else None
    for i in range(aug.self_verification if masked else 0):
        messages = _prompt("self_verification", question=masked[0], answer=problem.answer)
        out.append(_request("self_verification", messages, i, temperature, problem, None, spec))
    return out


def _solve_request(question: NewQuestion, spec: Spec) -> Request:
    # FOBAR's question is the same for every sample, so its samples are sampled solves; a
    # rephrased question is its own sample, solved greedily.
    fobar = question.augmentation == "fobar"
    temperature = spec.sampling.temperature if fobar else spec.sampling.solve_temperature
    return _request(
        "solve",
        _prompt("solve", question=question.text),
        question.sample if fobar else 0,
        temperature,
        question.problem,
        question.gold,
        spec,
    )


def _ask(
    requests: list[Request],
    spec: Spec,
    cache: Cache,
    ctx,
    bar,
    stats: Counter,
    verdicts: dict,
    errors: Counter,
) -> dict:
    """key -> reply text (None if it failed), from the cache or else the teacher; each reply that
    must reach a gold answer is checked as it arrives, into `verdicts` (key -> drop reason or None)."""

    def judge(request, text: str | None) -> None:
        if request.gold is not None:
            verdicts[request.key] = (
                "request_failed" if text is None else verify.check(request.gold, text)
            )
            stats["dropped" if verdicts[request.key] else "kept"] += 1

    unique = list({r.key: r for r in requests}.values())
    replies: dict[str, str | None] = cache.get_many([r.key for r in unique])
    for request in unique:
        if request.key in replies:
            judge(request, replies[request.key])
    stats["requests"] += len(unique)
    stats["cache_hits"] += len(replies)
    bar.update(len(requests) - len(unique) + len(replies))
    todo = [r for r in unique if r.key not in replies]

    async def drive() -> None:
        async for request, reply in teachers.stream(spec.teacher, todo, ctx):
            stats["sent"] += 1
            stats["retries"] += reply.retries
            if (
                reply.text is not None
            ):  # only finished requests are cached: a failed one is retried next run
                cache.put(request.key, request.task, request.messages, reply.text, reply.retries)
            replies[request.key] = reply.text
            judge(request, reply.text)
            bar.update(1)
            bar.set_postfix(
                kept=stats["kept"],
                dropped=stats["dropped"],
                cached=stats["cache_hits"],
                retries=stats["retries"],
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
        "request_hash": answer_key,  # the reply that is `answer`
        "question_request_hash": question_key,  # the reply that is `question`, if a teacher wrote it
    }


def _judge_first(
    requests: list, replies: dict, verdicts: dict, spec: Spec, seed: int, dropped: Counter
) -> tuple[list[dict], list[NewQuestion]]:
    """Records of verified answers, and the usable new questions (to be solved in round two)."""
    records, questions = [], []
    for request in requests:
        problem, text = request.problem, replies.get(request.key)
        if request.gold is not None:  # an answer: verified as it arrived
            if verdicts[request.key]:
                dropped[verdicts[request.key]] += 1
            else:
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
        elif text is None:
            dropped["request_failed"] += 1
        elif not text.strip():
            dropped["empty"] += 1
        elif _words(text) == _words(problem.question):
            dropped["unchanged_question"] += 1  # a "rephrasing" that says the same adds nothing
        else:
            gold = (
                problem.answer
                if request.task == "rephrase_question"
                else _mask_number(problem, seed)[1]
            )
            questions.append(
                NewQuestion(problem, request.task, request.sample, text.strip(), gold, request.key)
            )

    # FOBAR's backward question comes from a fixed template, not from the teacher.
    for problem in (
        {r.problem.id: r.problem for r in requests}.values() if spec.augmentations.fobar else []
    ):
        masked = _mask_number(problem, seed)
        if masked is None:
            dropped["no_number_to_mask"] += spec.augmentations.fobar
            continue
        template = Template((PROMPTS / "fobar.txt").read_text())
        text = template.substitute(question=masked[0], answer=problem.answer).strip()
        questions += [
            NewQuestion(problem, "fobar", i, text, masked[1], None)
            for i in range(spec.augmentations.fobar)
        ]
    return records, questions


def _judge_second(
    solves: list,
    questions: list[NewQuestion],
    replies: dict,
    verdicts: dict,
    spec: Spec,
    dropped: Counter,
) -> list[dict]:
    """A new question is kept only if the teacher's own solution of it reaches the gold answer."""
    records = []
    for request, question in zip(solves, questions, strict=True):
        if verdicts[request.key]:
            dropped[verdicts[request.key]] += 1
            continue
        records.append(
            _record(
                question.problem,
                question.augmentation,
                question.sample,
                question.text,
                replies[request.key],
                question.gold,
                request.key,
                spec,
                question.request_key,
            )
        )
    return records


def _dedupe_records(records: list[dict], seeds: list[Problem], dropped: Counter) -> list[dict]:
    """One record per (augmentation, question, answer), ordered by seed, augmentation, sample:
    the same file whatever order the replies came back in."""
    position = {p.id: i for i, p in enumerate(seeds)}
    order = {a: i for i, a in enumerate(Augmentations.model_fields)}
    records = sorted(
        records, key=lambda r: (position[r["seed_id"]], order[r["augmentation"]], r["sample"])
    )
    seen, out = set(), []
    for record in records:
        identity = [record["augmentation"], _words(record["question"]), _words(record["answer"])]
        key = hashlib.sha256(json.dumps(identity).encode()).digest()
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        out.append(record)
    return out
