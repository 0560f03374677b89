"""Synth.Math-Instruct: seed problems rephrased MetaMath-style by a teacher, every reply cached and verified.

    from data_synth import synthesize, SynthConfig
    result = synthesize(SynthConfig.model_validate({...}), seed=0, cache_path="requests.sqlite")

Seeds are deduplicated and decontaminated against held-out sets, then asked for in two rounds:
round one needs only the seed (rephrased questions and answers, fresh solutions, self-verification
questions); round two solves the questions round one wrote (and FOBAR's), because a new question is
kept only if the teacher's own solution of it reaches the gold answer. Every reply is committed to
a SQLite cache as it arrives, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Literal

from pydantic import Field, model_validator

from data_synth import arith, teachers, verify
from data_synth.cache import Cache, request_key
from data_synth.config import Strict, used_for
from data_synth.errors import DataSynthError, SynthFailed
from data_synth.exchange import Reply, Request, Runtime
from data_synth.fleet import FleetDown
from data_synth.scripted import ScriptedTeacher
from data_synth.seeds import (
    ArithSeeds,
    ListopsSeeds,
    Problem,
    SeedSource,
    arith_problem,
    load_problems,
)
from data_synth.teachers import TeacherSpec, teacher_model

PROMPTS = Path(__file__).parent / "prompts"

Augmentation = Literal[
    "rephrase_question",
    "rephrase_answer",
    "answer_augmentation",
    "fobar",
    "self_verification",
    "new_numbers",
]


class Augmentations(Strict):
    """Samples per seed for each MetaMath augmentation (0 turns one off).

    SOLAR's Synth.Math-Alignment needs rephrase_question and rephrase_answer; the rest are
    MetaMath's extra instruct data: fresh solutions (answer_augmentation), and backward questions
    that hide a number as X and give the answer (fobar: a fixed template; self_verification: the
    teacher restates question and answer as one statement). new_numbers is new data rather than
    new wording: the seed's generator draws other numbers for the same kind of problem and
    recomputes the answer, and the teacher's solution must reach it (generated `arith` seeds only,
    since a file's problems have no generator).
    """

    rephrase_question: int = Field(1, ge=0)
    rephrase_answer: int = Field(1, ge=0)
    answer_augmentation: int = Field(0, ge=0)
    fobar: int = Field(0, ge=0)
    self_verification: int = Field(0, ge=0)
    new_numbers: int = Field(0, ge=0)


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
        default_factory=list,
        description="the eval sets, as seed sources",
        json_schema_extra=used_for("eval"),
    )
    ngram: int = Field(13, ge=1, description="words per n-gram (13, as in GPT-3's decontamination)")
    threshold: float = Field(
        0.5, gt=0, le=1, description="drop when this share of a seed's n-grams is in an eval set"
    )


class SynthConfig(Strict):
    """What to rephrase, by which teacher, how many samples of what."""

    seeds: list[SeedSource] = Field(min_length=1)
    teacher: TeacherSpec = Field(json_schema_extra=used_for("teacher"))
    augmentations: Augmentations = Field(default_factory=Augmentations)
    sampling: Sampling = Field(default_factory=Sampling)
    decontaminate: Decontaminate = Field(default_factory=Decontaminate)
    max_failed_fraction: float = Field(
        0.02,
        ge=0,
        le=1,
        description="a run whose failed requests (after retries) exceed this share fails, "
        "rather than pass on a thinned data set; a rerun retries only the failed ones",
    )

    @model_validator(mode="after")
    def _new_numbers_needs_a_generator(self) -> SynthConfig:
        if self.augmentations.new_numbers and not any(
            isinstance(s, ArithSeeds) for s in self.seeds
        ):
            raise ValueError(
                "augmentations.new_numbers draws new numbers with the `arith` generator, and no "
                "seed source is arith: set it to 0"
            )
        return self

    @model_validator(mode="after")
    def _scripted_knows_only_arith(self) -> SynthConfig:
        if isinstance(self.teacher, ScriptedTeacher):
            if any(not isinstance(s, ArithSeeds | ListopsSeeds) for s in self.seeds):
                raise ValueError(
                    "the scripted teacher only knows `arith` and `listops` seeds: use another "
                    "teacher kind"
                )
            if self.augmentations.fobar and any(isinstance(s, ListopsSeeds) for s in self.seeds):
                raise ValueError(
                    "the scripted teacher does fobar on arith seeds only: set fobar to 0"
                )
            if self.augmentations.self_verification:
                raise ValueError(
                    "the scripted teacher cannot do self_verification: set it to 0 (fobar it can)"
                )
        return self


@dataclass
class Tally:
    """What one run asked, got, kept and lost: the progress bar's numbers and the manifest's."""

    requests: int = 0  # distinct requests of this run
    cache_hits: int = 0  # answered from the cache of an earlier run
    sent: int = 0  # sent to the teacher now
    retries: int = 0
    verified: int = 0  # replies that reached their gold answer, as they arrived
    rejected: int = 0  # replies that did not
    failed: Counter = field(default_factory=Counter)  # requests that failed for good, by error
    dropped: Counter = field(default_factory=Counter)  # seeds and records not kept, by reason
    servers: dict[str, ServerTally] = field(default_factory=dict)  # an HTTP fleet's, by URL

    def count_reply(self, reply: Reply) -> None:
        """A reply the teacher sent now: its retries, and each server's part in it."""
        self.sent += 1
        self.retries += reply.retries
        for server, kind in reply.errors:
            self.servers.setdefault(server, ServerTally()).errors[kind] += 1
        if reply.server is not None and reply.latency_s is not None:  # answered
            answered = self.servers.setdefault(reply.server, ServerTally())
            answered.answered += 1
            answered.latency_s += reply.latency_s

    def server_metrics(self) -> dict[str, dict]:
        """Per server (URL without userinfo): requests answered, failed attempts by kind
        (connection, timeout, 429, 5xx, 4xx), mean latency of the answered ones."""
        return {
            name: {
                "answered": s.answered,
                "errors": dict(sorted(s.errors.items())),
                "mean_latency_s": round(s.latency_s / s.answered, 4) if s.answered else None,
            }
            for name, s in sorted(self.servers.items())
        }


@dataclass
class ServerTally:
    answered: int = 0
    errors: Counter = field(default_factory=Counter)  # failed attempts, by kind
    latency_s: float = 0.0  # summed over the answered requests


@dataclass
class SynthResult:
    records: list[dict]  # verified, deduplicated, in seed order
    seeds: int  # seeds left after deduplication and decontamination
    tally: Tally
    teacher: str
    model: str

    def metrics(self) -> dict:
        kept = Counter(r["augmentation"] for r in self.records)
        return {
            "seeds": self.seeds,
            "requests": self.tally.requests,
            "requests_sent": self.tally.sent,
            "cache_hits": self.tally.cache_hits,
            "retries": self.tally.retries,
            "kept": len(self.records),
            "kept_by_augmentation": dict(sorted(kept.items())),
            "dropped": dict(sorted(self.tally.dropped.items())),
            "request_errors": dict(self.tally.failed.most_common()),
            "servers": self.tally.server_metrics(),
            "teacher": self.teacher,
            "model": self.model,
        }


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synthesize(
    config: SynthConfig,
    *,
    seed: int,
    cache_path: str | Path,
    resolve: Callable[[str], str] = str,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    log: Callable[[str], None] = _stderr,
    progress: bool = True,
) -> SynthResult:
    """Verified records for every seed of `config`, asking the teacher only what the cache at
    `cache_path` does not already hold. `resolve` maps a seed `path` or a teacher `model` to what
    to load. Raises DataSynthError (with the setting it concerns) for bad seeds or settings, and
    SynthFailed when more than `max_failed_fraction` of the requests failed or no record
    survived: every reply that arrived is cached, so a rerun resumes."""
    from tqdm import tqdm

    tally = Tally()
    seeds = _dedupe_seeds(_load(config.seeds, "seeds", seed, resolve), tally.dropped)
    seeds = _decontaminate(seeds, config.decontaminate, seed, resolve, tally.dropped)
    log(f"{len(seeds)} seeds after dedup and decontamination ({dict(tally.dropped)} dropped)")

    runtime = Runtime(seed, trust_remote_code, allow_pickle, resolve)
    cache, verdicts = Cache(Path(cache_path), log), {}
    first = [r for p in seeds for r in _first_round(p, config, seed)]
    bar = tqdm(
        total=len(first),
        unit="req",
        desc="synth",
        dynamic_ncols=True,
        mininterval=0.5,
        disable=not progress,
    )
    model = teacher_model(config.teacher)
    try:
        replies = _ask(first, config, cache, runtime, bar, tally, verdicts)
        records, questions = _judge_first(
            first, seeds, replies, verdicts, config, seed, tally.dropped
        )
        second = [_solve_request(q, config) for q in questions]
        bar.total += len(second)
        replies.update(_ask(second, config, cache, runtime, bar, tally, verdicts))
        records += _judge_second(second, questions, replies, verdicts, config, tally.dropped)
    except FleetDown as err:  # what arrived is cached; the tally says which server failed how
        result = SynthResult([], len(seeds), tally, config.teacher.kind, model)
        raise SynthFailed(str(err), result) from None
    finally:
        bar.close()
        cache.close()
    records = _dedupe_records(records, seeds, tally.dropped)
    result = SynthResult(records, len(seeds), tally, config.teacher.kind, model)
    failed = sum(tally.failed.values())
    if failed and failed > config.max_failed_fraction * tally.requests:
        errors = ", ".join(f"{error} x{n}" for error, n in tally.failed.most_common(3))
        raise SynthFailed(
            f"{failed} of {tally.requests} teacher requests failed ({errors}), more than "
            f"max_failed_fraction {config.max_failed_fraction:g}; the {tally.requests - failed} "
            "answered are cached: fix the teacher and rerun to send only the failed ones",
            result,
        )
    if not records:
        reasons = ", ".join(f"{r} x{n}" for r, n in tally.dropped.most_common(3)) or "no seeds"
        raise SynthFailed(f"no record survived verification ({reasons})", result)
    return result


# --------------------------------------------------------------------------- seeds


def _load(
    sources: list[SeedSource], key: str, seed: int, resolve: Callable[[str], str]
) -> list[Problem]:
    problems = []
    for i, source in enumerate(sources):
        try:
            problems += load_problems(source, seed, resolve)
        except DataSynthError as err:  # say which source: `seeds.1.path`
            setting = f"{key}.{i}" + (f".{err.setting}" if err.setting else "")
            raise DataSynthError(str(err), setting) from None
    return problems


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
    seeds: list[Problem], spec: Decontaminate, seed: int, resolve, dropped: Counter
) -> list[Problem]:
    if not spec.against:
        return seeds
    banned: set[tuple[str, ...]] = set()
    for problem in _load(spec.against, "decontaminate.against", seed, resolve):
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
    """A question written in round one (or by FOBAR's template, or new_numbers' generator), waiting
    for its solve in round two."""

    problem: Problem
    augmentation: str
    sample: int
    text: str
    gold: str  # the seed's answer, the masked number (backward), the recomputed one (new_numbers)
    request_key: str | None  # the request that wrote it; None for FOBAR's and new_numbers'


def _request(
    task: str,
    messages: list[dict],
    sample: int,
    temperature: float,
    problem: Problem,
    gold: str | None,
    config: SynthConfig,
) -> Request:
    sampling = {
        "temperature": temperature,
        "top_p": config.sampling.top_p,
        "max_tokens": config.sampling.max_tokens,
    }
    teacher = config.teacher
    key = request_key(teacher.kind, teacher_model(teacher), messages, sampling, sample)
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


def _first_round(problem: Problem, config: SynthConfig, seed: int) -> list[Request]:
    """Requests that need only the seed."""
    aug, temperature, question = config.augmentations, config.sampling.temperature, problem.question
    out = []
    for i in range(aug.rephrase_question):
        messages = _prompt("rephrase_question", question=question)
        out.append(_request("rephrase_question", messages, i, temperature, problem, None, config))
    for i in range(aug.rephrase_answer):
        messages = _prompt("rephrase_answer", question=question, solution=problem.solution)
        out.append(
            _request("rephrase_answer", messages, i, temperature, problem, problem.answer, config)
        )
    for i in range(aug.answer_augmentation):
        # a fresh solution: the solve prompt, sampled
        messages = _prompt("solve", question=question)
        out.append(
            _request(
                "answer_augmentation", messages, i, temperature, problem, problem.answer, config
            )
        )
    masked = _mask_number(problem, seed) if aug.self_verification else None
    for i in range(aug.self_verification if masked else 0):
        messages = _prompt("self_verification", question=masked[0], answer=problem.answer)
        out.append(_request("self_verification", messages, i, temperature, problem, None, config))
    return out


def _solve_request(question: NewQuestion, config: SynthConfig) -> Request:
    # FOBAR's question is the same for every sample, so its samples are sampled solves; a
    # rephrased question is its own sample, solved greedily.
    fobar = question.augmentation == "fobar"
    temperature = config.sampling.temperature if fobar else config.sampling.solve_temperature
    return _request(
        "solve",
        _prompt("solve", question=question.text),
        question.sample if fobar else 0,
        temperature,
        question.problem,
        question.gold,
        config,
    )


def _ask(
    requests: list[Request],
    config: SynthConfig,
    cache: Cache,
    runtime: Runtime,
    bar,
    tally: Tally,
    verdicts: dict,
) -> dict:
    """key -> reply text (None if it failed), from the cache or else the teacher; each reply that
    must reach a gold answer is checked as it arrives, into `verdicts` (key -> drop reason or None)."""

    def judge(request: Request, text: str | None) -> None:
        if request.gold is not None:
            verdict = "request_failed" if text is None else verify.check(request.gold, text)
            verdicts[request.key] = verdict
            if verdict:
                tally.rejected += 1
            else:
                tally.verified += 1

    unique = list({r.key: r for r in requests}.values())
    replies: dict[str, str | None] = cache.get_many([r.key for r in unique])
    for request in unique:
        if request.key in replies:
            judge(request, replies[request.key])
    tally.requests += len(unique)
    tally.cache_hits += len(replies)
    bar.update(len(requests) - len(unique) + len(replies))
    todo = [r for r in unique if r.key not in replies]

    async def drive() -> None:
        async for request, reply in teachers.stream(config.teacher, todo, runtime):
            tally.count_reply(reply)
            problem = reply.unusable
            if problem:  # failed, cut short or empty: not cached, so the next run asks again
                tally.failed[problem] += 1
                text = None
            else:
                text = reply.text
                cache.put(request.key, request.task, request.messages, text, reply.retries)
            replies[request.key] = text
            judge(request, text)
            bar.update(1)
            bar.set_postfix(
                kept=tally.verified,
                dropped=tally.rejected,
                failed=sum(tally.failed.values()),
                cached=tally.cache_hits,
                retries=tally.retries,
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
    config: SynthConfig,
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
        "teacher": config.teacher.kind,
        "model": teacher_model(config.teacher),
        "request_hash": answer_key,  # the reply that is `answer`
        "question_request_hash": question_key,  # the reply that is `question`, if a teacher wrote it
    }


def _judge_first(
    requests: list[Request],
    seeds: list[Problem],
    replies: dict,
    verdicts: dict,
    config: SynthConfig,
    seed: int,
    dropped: Counter,
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
                        config,
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
    fobar = config.augmentations.fobar
    for problem in seeds if fobar else []:  # every seed: round one may have asked nothing of it
        masked = _mask_number(problem, seed)
        if masked is None:
            dropped["no_number_to_mask"] += fobar
            continue
        template = Template((PROMPTS / "fobar.txt").read_text())
        text = template.substitute(question=masked[0], answer=problem.answer).strip()
        questions += [NewQuestion(problem, "fobar", i, text, masked[1], None) for i in range(fobar)]

    # new_numbers: the generator writes the new problem (in a wording picked per sample) and knows
    # its answer; only the solution is the teacher's.
    new = config.augmentations.new_numbers
    for problem in seeds if new else []:
        if problem.source != "arith":
            dropped["no_generator"] += new
            continue
        for i in range(new):
            variant = arith.variant(arith_problem(problem), i)
            text = random.Random(f"{seed}:{variant.id}").choice(variant.questions())
            questions.append(
                NewQuestion(problem, "new_numbers", i, text, str(variant.answer), None)
            )
    return records, questions


def _judge_second(
    solves: list[Request],
    questions: list[NewQuestion],
    replies: dict,
    verdicts: dict,
    config: SynthConfig,
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
                config,
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
