"""What passes between synthesis and a teacher: a request, its reply, and what a teacher needs from
its caller besides its settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from data_synth.seeds import Problem


@dataclass(frozen=True)
class Request:
    key: str  # data_synth.cache.request_key: teacher, model, messages, sampling, sample
    task: str  # which prompt made it: rephrase_question, rephrase_answer, solve, ...
    messages: list[dict[str, str]]
    sampling: dict[str, Any]  # temperature, top_p, max_tokens
    sample: int
    problem: Problem = field(compare=False)
    gold: str | None = None  # the final answer the reply must reach; None when it writes a question


@dataclass(frozen=True)
class Reply:
    text: str | None  # None: the request failed for good (after retries)
    retries: int = 0
    error: str | None = None  # why it failed: "HTTP 503", "APITimeoutError", ...
    truncated: bool = False  # the teacher stopped at max_tokens, not at the end of its answer
    # an HTTP fleet's server that answered (or last failed it), its URL without userinfo or query
    server: str | None = None
    latency_s: float | None = None  # of the answered attempt
    errors: tuple[tuple[str, str], ...] = ()  # (server, kind) of each failed attempt

    @property
    def unusable(self) -> str | None:
        """Why this reply cannot be kept as the request's final answer (it is then not cached,
        and the next run asks again: a teacher fixed meanwhile answers in full), or None."""
        if self.text is None:
            return self.error or "unknown error"
        if self.truncated:
            return "truncated at max_tokens"
        if not self.text.strip():
            return "empty reply"
        return None


@dataclass(frozen=True)
class Runtime:
    """What a teacher needs from its caller besides its settings."""

    seed: int = 0
    trust_remote_code: bool = False  # for a local model's own code (transformers, vllm)
    allow_pickle: bool = False  # load pickled weights (pytorch_model.bin): runs code from the file
    resolve: Callable[[str], str] = str  # a teacher `model` -> the path or Hub id to load
