"""The scripted teacher: no LLM, answers from the tiny world's generators (data_synth.arith,
data_synth.listops), for the tiny recipes and the tests. Generated data: its code is part of what
data_synth.generated fingerprints."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator
from typing import ClassVar, Literal

from pydantic import Field

from data_synth.config import Strict
from data_synth.exchange import Reply, Request, Runtime


class ScriptedTeacher(Strict):
    """No LLM: answers `arith` seeds from the generator's own wordings, for the tiny recipe and tests.

    A rephrased question is another wording of the same problem; a rephrased or fresh answer is
    another wording of its worked solution; a FOBAR backward question (one number masked as X,
    the answer given) is solved for X and checked forward. With probability `error_rate` an answer is deliberately
    spoiled (wrong boxed number, or no \\boxed{} at all) so verification has something real to
    drop. Deterministic per request key. It knows arith and listops problems, nothing else.
    """

    GENERATED: ClassVar[bool] = True  # its answers are the generators' own wordings

    kind: Literal["scripted"] = "scripted"
    error_rate: float = Field(0.1, ge=0, le=1, description="share of answers deliberately spoiled")
    delay_s: float = Field(
        0.0, ge=0, description="simulated latency per request (tests of kill/resume)"
    )


async def stream(
    spec: ScriptedTeacher, requests: list[Request], runtime: Runtime
) -> AsyncIterator[tuple[Request, Reply]]:
    for request in requests:
        if spec.delay_s:
            await asyncio.sleep(spec.delay_s)
        yield request, Reply(scripted_reply(request, spec.error_rate))


def scripted_reply(request: Request, error_rate: float) -> str:
    from data_synth import arith
    from data_synth.seeds import arith_problem

    if request.problem.source == "listops":
        return _scripted_listops(request, error_rate)
    problem = arith_problem(request.problem)
    if request.task == "solve":  # solve what is asked, which may be another problem (new_numbers)
        asked = arith.parse(request.messages[-1]["content"].split("Problem:", 1)[-1])
        problem = asked or problem
    rng = random.Random(request.key)
    if request.task == "rephrase_question":
        others = problem.questions()[1:] or problem.questions()
        return rng.choice(others)
    backward = _backward(problem, request.messages[-1]["content"])
    if backward is not None:
        text, answer = backward
    else:
        # a rephrased answer is another wording, never the original (the canonical first one)
        wordings = (
            problem.solutions()[1:] if request.task == "rephrase_answer" else problem.solutions()
        )
        text, answer = rng.choice(wordings), problem.answer
    if rng.random() < error_rate:  # a deliberately imperfect answer, for verification to catch
        if rng.random() < 0.5:
            return text.replace(f"\\boxed{{{answer}}}", f"\\boxed{{{answer + 1}}}")
        return re.sub(r"\\boxed\{(\d+)\}", r"\1", text)
    return text


def _scripted_listops(request: Request, error_rate: float) -> str:
    """As for arith: other wordings of the question or of the worked solution; a spoiled answer
    reaches the mistake one would expect for the kind, or has no \\boxed{}."""
    from data_synth.listops import ListProblem

    meta = request.problem.metadata
    problem = ListProblem(
        id=request.problem.id,
        kind=meta["kind"],
        args=tuple(meta["args"]),
        answer=request.problem.answer,
    )
    rng = random.Random(request.key)
    if request.task == "rephrase_question":
        return rng.choice(problem.questions()[1:] or problem.questions())
    wordings = problem.solutions()[1:] if request.task == "rephrase_answer" else problem.solutions()
    choice = rng.randrange(len(wordings))
    if rng.random() < error_rate:
        if rng.random() < 0.5:
            offset = len(problem.solutions()) - len(wordings)
            return problem.solutions_with(problem.wrong_answer())[offset + choice]
        return re.sub(r"\\boxed\{(.*)\}", r"\1", wordings[choice])
    return wordings[choice]


def _backward(problem, prompt: str) -> tuple[str, int] | None:
    """FOBAR's backward question ("... X ... If we know the answer ... is A, what is X?"), solved:
    X is the number that, written in place of X, makes one of the problem's wordings, whose
    forward solution then reaches A. None when the prompt is no backward question of `problem`."""
    asked = re.search(r"answer to the above question is (-?\d+)", prompt)
    if "unknown variable X" not in prompt or asked is None:
        return None
    # the line before "If we know ...": arith questions are one line
    masked = prompt[: asked.start()].rsplit("\n", 1)[0].rsplit("\n", 1)[-1].strip()
    pattern = re.sub(r"(?<![A-Za-z])X(?![A-Za-z])", r"(\\d+)", re.escape(masked))
    for question in problem.questions():
        found = re.fullmatch(pattern, question)
        if found and int(asked.group(1)) == problem.answer:
            x = int(found.group(1))
            forward = problem.solution.replace(f"\\boxed{{{problem.answer}}}", str(problem.answer))
            return (
                f"Put X = {x} into the question and solve it forward: {forward} That is "
                f"{problem.answer}, the answer we were given, so X = \\boxed{{{x}}}.",
                x,
            )
    return None
