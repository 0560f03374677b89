"""Seeded list and string instructions with exact answers: the tiny world's "general" task beside arithmetic.

Reverse a list, sort numbers, count a letter, find the largest number, join words, take the last
item: each answer is computed, not written, so it is exact, and every problem ends its worked
solution in \\boxed{}. As in data_synth.arith, a problem is identified by its kind and arguments,
and train, synth seeds and eval are split by a hash of that identity (data_synth.splits).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from data_synth import splits

WORDS = ["cat", "dog", "sun", "map", "cup", "hat", "pen", "box", "owl", "fig", "jam", "kit"]
LETTERS = "abcdefghijklmnop"


@dataclass(frozen=True)
class Kind:
    draw: Callable[[random.Random], tuple]  # the arguments of one problem
    answer: Callable[..., str]
    questions: tuple[str, ...]  # wordings; {items} is the argument as written
    solutions: tuple[str, ...]  # worked solutions ending in \boxed{{{ans}}}


def _words(rng: random.Random) -> tuple:
    return tuple(rng.sample(WORDS, rng.randint(3, 5)))


def _numbers(rng: random.Random) -> tuple:
    return tuple(rng.randint(1, 60) for _ in range(rng.randint(3, 5)))


def _letter_word(rng: random.Random) -> tuple:
    letters = rng.sample(LETTERS[:6], 3)
    word = "".join(rng.choice(letters) for _ in range(rng.randint(5, 8)))
    return (letters[0], word)


def _listed(items: tuple) -> str:
    return "[" + ", ".join(map(str, items)) + "]"


KINDS: dict[str, Kind] = {
    "reverse": Kind(
        draw=_words,
        answer=lambda *items: _listed(items[::-1]),
        questions=(
            "Reverse the list {items}.",
            "Write the list {items} in reverse order.",
            "What is {items} read from the end to the start?",
        ),
        solutions=(
            "Take the items from the last to the first: \\boxed{{{ans}}}.",
            "Reading {items} backwards gives \\boxed{{{ans}}}.",
        ),
    ),
    "sort": Kind(
        draw=_numbers,
        answer=lambda *items: _listed(sorted(items)),
        questions=(
            "Sort {items} from smallest to largest.",
            "Put the numbers {items} in increasing order.",
            "Arrange {items} in ascending order.",
        ),
        solutions=(
            "Ordering the numbers from the smallest up gives \\boxed{{{ans}}}.",
            "Smallest first: \\boxed{{{ans}}}.",
        ),
    ),
    "count": Kind(
        draw=_letter_word,
        answer=lambda letter, word: str(word.count(letter)),
        questions=(
            "How many times does the letter {letter} appear in {word}?",
            "Count the letter {letter} in the string {word}.",
            "In {word}, how often is {letter} found?",
        ),
        solutions=(
            "Going through {word} letter by letter, {letter} appears {ans} times. "
            "The answer is \\boxed{{{ans}}}.",
            "{letter} occurs in {word} exactly \\boxed{{{ans}}} times.",
        ),
    ),
    "largest": Kind(
        draw=_numbers,
        answer=lambda *items: str(max(items)),
        questions=(
            "What is the largest number in {items}?",
            "Which number in {items} is the biggest?",
            "Find the maximum of {items}.",
        ),
        solutions=(
            "Comparing the numbers one by one, the largest is \\boxed{{{ans}}}.",
            "The biggest of {items} is \\boxed{{{ans}}}.",
        ),
    ),
    "join": Kind(
        draw=_words,
        answer=lambda *items: "-".join(items),
        questions=(
            "Join the words {items} with dashes.",
            "Connect {items} into one string, a dash between each pair.",
            "Write {items} as one word with - between the items.",
        ),
        solutions=(
            "Putting a dash between the words gives \\boxed{{{ans}}}.",
            "Joined with dashes: \\boxed{{{ans}}}.",
        ),
    ),
    "last": Kind(
        draw=_words,
        answer=lambda *items: items[-1],
        questions=(
            "What is the last item of {items}?",
            "Which word ends the list {items}?",
            "Name the final element of {items}.",
        ),
        solutions=(
            "The list ends with \\boxed{{{ans}}}.",
            "Its last element is \\boxed{{{ans}}}.",
        ),
    ),
}


@dataclass(frozen=True)
class ListProblem:
    id: str
    kind: str
    args: tuple
    answer: str

    @property
    def split(self) -> str:
        return split_of(self.kind, self.args)

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

    def solutions_with(self, answer: str) -> list[str]:
        """The worked solutions, reaching `answer` instead: a wrong answer's wordings."""
        return [w.format(**{**self._slots(), "ans": answer}) for w in KINDS[self.kind].solutions]

    def wrong_answer(self) -> str:
        """The mistake one would expect for this kind (the list left as it was, the smallest for
        the largest, the count off by one ...); never the right answer."""
        items = self.args
        mistakes = {
            "reverse": lambda: [_listed(items), _listed(items[1:] + items[:1])],
            "sort": lambda: [_listed(sorted(items, reverse=True)), _listed(items)],
            "count": lambda: [str(int(self.answer) + 1)],
            "largest": lambda: [str(min(items)), str(sorted(items)[-2])],
            "join": lambda: ["-".join(reversed(items)), "-".join(items[1:])],
            "last": lambda: [str(items[0]), str(items[-2])],
        }
        return next(c for c in mistakes[self.kind]() if c != self.answer)

    def _slots(self) -> dict[str, object]:
        if self.kind == "count":
            return {"letter": self.args[0], "word": self.args[1], "ans": self.answer}
        return {"items": _listed(self.args), "ans": self.answer}


def split_of(kind: str, args: tuple) -> str:
    return splits.split_of(f"listops:{kind}:{args}")


def problems(count: int, seed: int, split: str = "train") -> list[ListProblem]:
    """`count` distinct problems of one split, the same for the same seed."""
    splits.check_split(split)
    out: list[ListProblem] = []
    seen: set[tuple] = set()
    for problem in _stream(seed):
        key = (problem.kind, problem.args)
        if problem.split != split or key in seen:
            continue
        seen.add(key)
        out.append(problem)
        if len(out) == count:
            return out
    raise AssertionError("unreachable: the stream is infinite")


def _stream(seed: int) -> Iterator[ListProblem]:
    rng = random.Random(f"listops:{seed}")
    kinds = sorted(KINDS)
    for _ in range(10_000_000):
        kind = rng.choice(kinds)
        args = KINDS[kind].draw(rng)
        ident = hashlib.sha256(f"{kind}:{args}".encode()).hexdigest()[:12]
        yield ListProblem(
            id=f"listops-{ident}", kind=kind, args=args, answer=KINDS[kind].answer(*args)
        )
    raise ValueError("asked for more distinct list problems than exist")


def corpus(count: int, seed: int) -> list[str]:
    """Plain text: train problems in a fixed but varied wording each (`Question: ...\\nAnswer: ...`)."""
    from data_synth.arith import plain_text

    texts = []
    for problem in problems(count, seed, "train"):
        rng = random.Random(problem.id)
        texts.append(plain_text(rng.choice(problem.questions()), rng.choice(problem.solutions())))
    return texts


def noise(count: int, seed: int, length: int = 40) -> list[str]:
    """Near-random text (letters, digits and spaces drawn uniformly): a domain nothing can be
    learned from beyond its letter frequencies, for data-mixing experiments."""
    rng = random.Random(f"noise:{seed}")
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789     "
    return ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(count)]
