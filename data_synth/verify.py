"""Answer checking with math-verify: is a teacher's final \\boxed{} answer the gold answer?"""

from __future__ import annotations

import logging
import threading

from data_synth.seeds import last_boxed


def check(gold: str, text: str | None) -> str | None:
    """None when `text` ends in a boxed answer equal to `gold`, else the reason to drop it.

    Reasons: empty, no_boxed_answer, wrong_answer.
    """
    if text is None or not text.strip():
        return "empty"
    answer = last_boxed(text)
    if not answer:
        return "no_boxed_answer"
    return None if same_answer(gold, answer) else "wrong_answer"


def same_answer(gold: str, answer: str) -> bool:
    """math-verify equivalence (3/4 == 0.75 == \\frac{3}{4}, 1,234 == 1234), gold first as its API wants."""
    from math_verify import parse, verify

    if _normalize(gold) == _normalize(answer):
        return True  # the common case, without sympy
    # math-verify's timeouts use SIGALRM, which only works on the main thread: off elsewhere
    # (it then warns on every call, hence the quieter logger).
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # Both wrapped in \boxed{} so plain "12" and LaTeX "\frac{1}{2}" parse alike.
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    answer_parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout))


def _normalize(text: str) -> str:
    return text.replace(" ", "").replace("$", "").rstrip(".")
