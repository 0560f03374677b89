"""Answer checking with math-verify: the one definition of "correct", for synth's verifier and for eval."""

from __future__ import annotations

import logging
import re
import threading

from data_synth.seeds import last_boxed


def check(gold: str, text: str | None) -> str | None:
    """None when `text` ends in a boxed answer equal to `gold`, else the reason to drop it.

    Reasons: empty, no_boxed_answer, wrong_answer. A teacher is told to box its answer, so an
    unboxed one is not guessed at.
    """
    if text is None or not text.strip():
        return "empty"
    answer = last_boxed(text)
    if not answer:
        return "no_boxed_answer"
    return None if same_answer(gold, answer) else "wrong_answer"


def grade(gold: str, prediction: str) -> tuple[str, bool]:
    """(the answer read from a model's `prediction`, whether it equals `gold`), for eval.

    The last \\boxed{} answer if there is one, else the last expression math-verify finds: an
    evaluated model may not box its answer, and should not score zero only for that.
    """
    boxed = last_boxed(prediction)
    if boxed:
        return boxed, same_answer(gold, boxed)
    found = _parse(prediction)
    if not found:
        return "", False
    return str(found[-1]), _verify(_parse(f"\\boxed{{{gold}}}"), found)


def same_answer(gold: str, answer: str) -> bool:
    """math-verify equivalence (3/4 == 0.75 == \\frac{3}{4}, 1,234 == 1234), gold first as its API
    wants; answers in words (MATH's \\text{...} answers, yes/no) compared as words."""
    if _normalize(gold) == _normalize(answer):
        return True  # the common case, without sympy
    if _in_words(gold) or _in_words(answer):
        # math-verify reads a word as a product of symbols, so Paris would equal Sirap
        return _words(gold) == _words(answer)
    # Both wrapped in \boxed{} so plain "12" and LaTeX "\frac{1}{2}" parse alike.
    gold_parsed, answer_parsed = _parse(f"\\boxed{{{gold}}}"), _parse(f"\\boxed{{{answer}}}")
    if not gold_parsed or not answer_parsed:
        return False
    return _verify(gold_parsed, answer_parsed)


def _timeout() -> int | None:
    # math-verify bounds its work with SIGALRM, which only works on the main thread: off
    # elsewhere (it then warns on every call, hence the quieter logger).
    if threading.current_thread() is threading.main_thread():
        return 5
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return None


def _parse(text: str) -> list:
    from math_verify import parse

    return parse(text, parsing_timeout=_timeout())


def _verify(gold: list, answer: list) -> bool:
    from math_verify import verify

    return bool(verify(gold, answer, timeout_seconds=_timeout()))


TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|mathrm|mbox)\{([^{}]*)\}")


def _in_words(answer: str) -> bool:
    """An answer that is words, not a mathematical expression: a run of letters that is not a
    LaTeX command, and no digit (10\\text{ cm} is a number with a unit)."""
    bare = re.sub(r"\\[A-Za-z]+", "", TEXT_COMMAND.sub(r"\1", answer))
    return bool(re.search(r"[A-Za-z]{2,}", bare)) and not re.search(r"\d", bare)


def _words(answer: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", TEXT_COMMAND.sub(r"\1", answer).lower()).strip()


def _normalize(text: str) -> str:
    return text.replace(" ", "").replace("$", "").rstrip(".")
