"""Seeded multi-step arithmetic word problems, in several wordings, with worked solutions.

This is the task the tiny recipe can actually learn on two CPU cores: small numbers, two steps,
a final answer in \\boxed{}. Every problem is identified by its kind and numbers; train, synth
seeds and eval are split by a hash of that identity (data_synth.splits), so no eval problem
appears in training under any wording.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from data_synth import splits

NAMES = ["Ana", "Ben", "Cleo", "Dev", "Ema", "Finn", "Gia", "Hugo", "Ivy", "Jon", "Kai", "Lea"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "shells", "pens", "cards"]


@dataclass(frozen=True)
class ArithProblem:
    id: str
    kind: str
    numbers: tuple[int, ...]
    name: str
    item: str
    answer: int

    @property
    def split(self) -> str:
        return split_of(self.kind, self.numbers)

    def questions(self) -> list[str]:
        """Every wording of the question; the first is the canonical one."""
        return [w.format(**self._slots()) for w in KINDS[self.kind].questions]

    def solutions(self) -> list[str]:
        """Every wording of the worked solution, each ending in \\boxed{answer}."""
        return [w.format(**self._slots()) for w in KINDS[self.kind].solutions]

    @property
    def question(self) -> str:
        return self.questions()[0]

    @property
    def solution(self) -> str:
        return self.solutions()[0]

    def _slots(self) -> dict[str, object]:
        return {
            "name": self.name,
            "item": self.item,
            "ans": self.answer,
            **KINDS[self.kind].steps(*self.numbers),
        }


@dataclass(frozen=True)
class Kind:
    draw: Callable[[random.Random], tuple[int, ...]]  # numbers for one problem
    steps: Callable[..., dict[str, int]]  # numbers -> named values used in the wordings
    answer: Callable[..., int]
    questions: tuple[str, ...]
    solutions: tuple[str, ...]


def _divisible(rng: random.Random) -> tuple[int, int, int]:
    c = rng.randint(2, 6)
    total = c * rng.randint(2, 9)
    a = rng.randint(1, total - 1)
    return a, total - a, c


KINDS: dict[str, Kind] = {
    "buy_packs": Kind(
        draw=lambda r: (r.randint(2, 20), r.randint(2, 5), r.randint(2, 9)),
        steps=lambda a, b, c: {"a": a, "b": b, "c": c, "bc": b * c},
        answer=lambda a, b, c: a + b * c,
        questions=(
            "{name} has {a} {item}. {name} buys {b} packs with {c} {item} in each pack. How many {item} does {name} have now?",
            "There are {a} {item} with {name}. Then {name} gets {b} packs of {c} {item}. How many {item} are there in total?",
            "{name} starts with {a} {item} and adds {b} packs holding {c} {item} each. What is the total number of {item}?",
        ),
        solutions=(
            "The packs hold {b} * {c} = {bc} {item}. Together with the {a} {item}: {a} + {bc} = {ans}. The answer is \\boxed{{{ans}}}.",
            "First, {b} packs of {c} make {b} * {c} = {bc}. Then {a} + {bc} = {ans}. So {name} has \\boxed{{{ans}}} {item}.",
        ),
    ),
    "give_find": Kind(
        draw=lambda r: (lambda a: (a, r.randint(1, a - 1), r.randint(1, 20)))(r.randint(5, 40)),
        steps=lambda a, b, c: {"a": a, "b": b, "c": c, "ab": a - b},
        answer=lambda a, b, c: a - b + c,
        questions=(
            "{name} has {a} {item}, gives away {b} of them, and then finds {c} more. How many {item} does {name} have?",
            "After giving {b} of {a} {item} to a friend, {name} finds {c} {item}. How many {item} does {name} have now?",
            "{name} had {a} {item}. {name} lost {b} and later found {c}. How many {item} are left with {name}?",
        ),
        solutions=(
            "After giving away: {a} - {b} = {ab}. After finding more: {ab} + {c} = {ans}. The answer is \\boxed{{{ans}}}.",
            "{name} keeps {a} - {b} = {ab} {item}, then {ab} + {c} = {ans}. So the answer is \\boxed{{{ans}}}.",
        ),
    ),
    "share": Kind(
        draw=_divisible,
        steps=lambda a, b, c: {"a": a, "b": b, "c": c, "ab": a + b},
        answer=lambda a, b, c: (a + b) // c,
        questions=(
            "{name} has {a} {item} and gets {b} more, then shares them equally among {c} friends. How many {item} does each friend get?",
            "{name} puts {a} {item} and {b} {item} together and splits them evenly into {c} groups. How many {item} are in each group?",
            "There are {a} red {item} and {b} blue {item}. {name} divides all of them equally among {c} kids. How many does each kid get?",
        ),
        solutions=(
            "In total there are {a} + {b} = {ab} {item}. Shared by {c}: {ab} / {c} = {ans}. The answer is \\boxed{{{ans}}}.",
            "First add: {a} + {b} = {ab}. Then divide: {ab} / {c} = {ans}. Each gets \\boxed{{{ans}}}.",
        ),
    ),
    "rows": Kind(
        draw=lambda r: (lambda a, b: (a, b, r.randint(1, a * b - 1)))(
            r.randint(2, 9), r.randint(2, 9)
        ),
        steps=lambda a, b, c: {"a": a, "b": b, "c": c, "ab": a * b},
        answer=lambda a, b, c: a * b - c,
        questions=(
            "{name} sets out {a} rows of {b} {item}. Then {c} {item} are taken away. How many {item} are left?",
            "There are {a} rows with {b} {item} in each row, and {name} removes {c} of them. How many {item} remain?",
            "{name} arranges {item} in {a} rows of {b}, then gives away {c}. How many {item} does {name} still have?",
        ),
        solutions=(
            "The rows hold {a} * {b} = {ab} {item}. After removing {c}: {ab} - {c} = {ans}. The answer is \\boxed{{{ans}}}.",
            "Count first: {a} * {b} = {ab}. Take away {c}: {ab} - {c} = {ans}. So \\boxed{{{ans}}} {item} remain.",
        ),
    ),
}


def split_of(kind: str, numbers: tuple[int, ...]) -> str:
    return splits.split_of(f"{kind}:{numbers}")


def problems(count: int, seed: int, split: str = "train") -> list[ArithProblem]:
    """`count` distinct problems of one split, the same for the same seed."""
    splits.check_split(split)
    out: list[ArithProblem] = []
    seen: set[tuple] = set()
    for problem in _stream(seed):
        key = (problem.kind, problem.numbers)
        if problem.split != split or key in seen:
            continue
        seen.add(key)
        out.append(problem)
        if len(out) == count:
            return out
    raise AssertionError("unreachable: the stream is infinite")


def _stream(seed: int) -> Iterator[ArithProblem]:
    rng = random.Random(seed)
    kinds = sorted(KINDS)
    attempts = 0
    while True:
        attempts += 1
        if attempts > 10_000_000:
            raise ValueError("asked for more distinct arithmetic problems than exist")
        kind = rng.choice(kinds)
        numbers = KINDS[kind].draw(rng)
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        ident = hashlib.sha256(f"{kind}:{numbers}:{name}:{item}".encode()).hexdigest()[:12]
        yield ArithProblem(
            id=f"arith-{ident}",
            kind=kind,
            numbers=numbers,
            name=name,
            item=item,
            answer=KINDS[kind].answer(*numbers),
        )


def variant(problem: ArithProblem, sample: int) -> ArithProblem:
    """The same kind of problem with its numbers drawn again (`sample` picks which draw) and the
    answer recomputed: MetaMath-style new data rather than a new wording of the same data. The
    draw stays in the seed's split, so a variant of a synth seed is never an eval problem."""
    rng = random.Random(f"variant:{problem.id}:{sample}")
    kind = KINDS[problem.kind]
    for _ in range(10_000):
        numbers = kind.draw(rng)
        if numbers != problem.numbers and split_of(problem.kind, numbers) == problem.split:
            ident = hashlib.sha256(f"{problem.id}:{numbers}".encode()).hexdigest()[:12]
            return dataclasses.replace(
                problem, id=f"arith-{ident}", numbers=numbers, answer=kind.answer(*numbers)
            )
    raise AssertionError(f"no other numbers for {problem.kind} in split {problem.split}")


def parse(question: str) -> ArithProblem | None:
    """The problem a question states, in any of the wordings (numbers, name and item read back);
    None for a question that is no arith problem. How the scripted teacher reads what it is asked."""
    for name, pattern in _question_patterns():
        found = pattern.fullmatch(question.strip())
        if found:
            numbers = tuple(int(found[slot]) for slot in "abc")
            return ArithProblem(
                id=f"arith-parsed-{name}-{'-'.join(map(str, numbers))}",
                kind=name,
                numbers=numbers,
                name=found["name"],
                item=found["item"],
                answer=KINDS[name].answer(*numbers),
            )
    return None


_SLOT_PATTERNS = {"name": "[A-Z][a-z]+", "item": "[a-z]+"}  # every other slot is a number


@functools.cache
def _question_patterns() -> list[tuple[str, re.Pattern]]:
    """Every question wording as a regex, compiled once: each slot a named group the first time
    it appears, a back-reference after."""
    patterns = []
    for name, kind in KINDS.items():
        for wording in kind.questions:
            out, seen = [], set()
            for literal, slot, _, _ in string.Formatter().parse(wording):
                out.append(re.escape(literal))
                if slot is not None:
                    group = _SLOT_PATTERNS.get(slot, r"\d+")
                    out.append(f"(?P={slot})" if slot in seen else f"(?P<{slot}>{group})")
                    seen.add(slot)
            patterns.append((name, re.compile("".join(out))))
    return patterns


def plain_prompt(question: str) -> str:
    """The pretraining text's format up to where the answer starts: how a base model is asked."""
    return f"Question: {question}\nAnswer:"


def plain_text(question: str, solution: str) -> str:
    """One problem as pretraining text."""
    return f"{plain_prompt(question)} {solution}"


def corpus(count: int, seed: int) -> list[str]:
    """Plain text for pretraining and tokenizer training: train problems in every wording."""
    texts = []
    for problem in problems(count, seed, "train"):
        rng = random.Random(problem.id)
        texts.append(plain_text(rng.choice(problem.questions()), rng.choice(problem.solutions())))
    return texts
