"""Teachers that answer rephrasing requests: an OpenAI-compatible fleet, vLLM, a local transformers model, or a script.

Every teacher is one async generator, `stream(spec, requests, runtime)`, yielding `(request, reply)`
as replies finish (in any order), so the caller can commit each one to the cache the moment it exists.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from data_synth import scripted
from data_synth.config import Strict, names
from data_synth.errors import DataSynthError
from data_synth.exchange import Reply, Request, Runtime
from data_synth.fleet import Fleet, FleetDown, retry_budget_s
from data_synth.scripted import ScriptedTeacher

# --------------------------------------------------------------------------- specs


class OpenAITeacher(Strict):
    """Any OpenAI-compatible chat endpoint: vLLM, SGLang, TGI, llama.cpp, `transformers serve`, OpenAI."""

    kind: Literal["openai"] = "openai"
    model: str = Field(
        description="the model name the server knows (for `transformers serve`: its path)"
    )
    base_urls: list[str] = Field(
        min_length=1,
        description="several servers = one fleet: each request goes to the server with the least "
        "expected wait (in flight x latency); one that fails is backed off and probed until it answers",
    )
    api_key_env: str | None = Field(
        None,
        description="environment variable holding the API key; the key is never stored or printed",
    )
    concurrency: int = Field(32, ge=1, description="requests in flight at once, over all servers")
    max_retries: int = Field(
        6, ge=0, description="retries on 429, 5xx, timeouts and connection errors"
    )
    timeout_s: float = Field(120.0, gt=0, description="per request")
    backoff_s: float = Field(
        1.0,
        ge=0,
        description="a server that failed is tried again after about this long, doubling with "
        "each failure in a row",
    )
    backoff_max_s: float = Field(60.0, ge=0)

    @field_validator("api_key_env")
    @classmethod
    def _a_name_not_a_key(cls, name: str | None) -> str | None:
        # a key pasted here would end up in manifests and logs: refuse it, and never repeat it
        if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(
                "must be the name of an environment variable (e.g. TEACHER_API_KEY) that holds "
                "the key, not the key itself; the value given is not shown"
            )
        return name

    @field_validator("base_urls")
    @classmethod
    def _http(cls, urls: list[str]) -> list[str]:
        for i, url in enumerate(urls):
            parts = urlsplit(url)
            # the URLs are stored in manifests and logged: a key in `user:KEY@` or `?key=` would
            # be too, so it is refused, and the URL is not repeated
            if parts.username or parts.password or parts.query or parts.fragment:
                raise ValueError(
                    f"entry {i} has credentials, a query or a fragment, which manifests and logs "
                    "would keep: give the bare server URL (e.g. https://host/v1) and the key in "
                    "api_key_env; the URL given is not shown"
                )
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"'{url}' is not an http(s) URL, e.g. http://localhost:8000/v1")
        return urls


class VllmTeacher(Strict):
    """Offline batch generation with `vllm.LLM` on this machine's GPUs (pip install vllm)."""

    kind: Literal["vllm"] = "vllm"
    model: str = Field(
        description="a stage of this recipe, a local path or a Hub id",
        json_schema_extra=names("model"),
    )
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1, description="default: the model's")
    dtype: str = "auto"
    batch_size: int = Field(
        1024, ge=1, description="requests per llm.chat call; the cache commits between calls"
    )


class TransformersTeacher(Strict):
    """A local model through transformers' generate(), batched, with its chat template."""

    kind: Literal["transformers"] = "transformers"
    model: str = Field(
        description="a stage of this recipe, a local path or a Hub id",
        json_schema_extra=names("model"),
    )
    batch_size: int = Field(8, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("cpu", description="cpu, cuda, cuda:1, mps ...")


TeacherSpec = Annotated[
    OpenAITeacher | VllmTeacher | TransformersTeacher | ScriptedTeacher, Field(discriminator="kind")
]


def teacher_model(spec: TeacherSpec) -> str:
    """The model name recorded in request keys and provenance."""
    # versioned: a change in what the script answers must not be served from an old cache
    return "arith-script-2" if isinstance(spec, ScriptedTeacher) else spec.model


def stream(
    spec: TeacherSpec, requests: list[Request], runtime: Runtime
) -> AsyncIterator[tuple[Request, Reply]]:
    streams = {
        "openai": _openai,
        "vllm": _vllm,
        "transformers": _transformers,
        "scripted": scripted.stream,
    }
    return streams[spec.kind](spec, requests, runtime)


# --------------------------------------------------------------------------- openai

POOL = 16  # workers sharing one HTTP client (connection pool)


async def _openai(
    spec: OpenAITeacher, requests: list[Request], runtime: Runtime
) -> AsyncIterator[tuple[Request, Reply]]:
    from openai import AsyncOpenAI

    api_key = "EMPTY"  # local servers want some key, and ignore it
    if spec.api_key_env:
        api_key = os.environ.get(spec.api_key_env, "")
        if not api_key:
            raise DataSynthError(
                f"environment variable {spec.api_key_env} is not set", "teacher.api_key_env"
            )
    # max_retries=0: the retries (and their count) are ours, spread over the fleet. Several clients
    # per server, each used by at most POOL workers: httpx scans every connection of its pool on
    # each request, which at 64+ connections in one pool costs more CPU than the request itself.
    per_url = -(-spec.concurrency // POOL)
    clients = [
        [
            AsyncOpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=spec.timeout_s)
            for _ in range(per_url)
        ]
        for url in spec.base_urls
    ]
    # The fleet is given up on when every server has been down for longer than the retry budget,
    # and at least one request timeout: a server that may take that long to answer is not known
    # dead sooner, and a blip (one 503, tiny test backoffs) must not end a run.
    give_up_after = max(
        retry_budget_s(spec.backoff_s, spec.backoff_max_s, spec.max_retries), spec.timeout_s
    )
    fleet = Fleet(spec.base_urls, spec.backoff_s, spec.backoff_max_s, give_up_after)
    pending = iter(requests)  # shared by the workers: each pulls the next request
    done: asyncio.Queue[tuple[Request, Reply] | FleetDown] = asyncio.Queue()

    async def worker(number: int) -> None:
        # this worker's client for each server
        pools = {s.index: clients[s.index][number % per_url] for s in fleet.servers}
        for request in pending:
            try:
                reply = await _openai_one(spec, fleet, pools, request)
            except FleetDown as err:  # the request was not sent: the next run asks it again
                done.put_nowait(err)
                return
            except Exception as err:  # never lose the request: report it as failed
                reply = Reply(None, error=f"{type(err).__name__}: {err}")
            done.put_nowait((request, reply))

    # `concurrency` workers, not one task per request: memory stays flat at a million requests.
    workers = [asyncio.create_task(worker(n)) for n in range(min(spec.concurrency, len(requests)))]
    try:
        for _ in range(len(requests)):
            item = await done.get()
            if isinstance(item, FleetDown):
                raise item
            yield item
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for server in clients:
            for client in server:
                await client.close()


async def _openai_one(spec: OpenAITeacher, fleet: Fleet, clients: dict, request: Request) -> Reply:
    """One request, tried on the fleet's choice of server, and on another after each failure
    (the fleet decides which, and when a server that failed is tried again), at most
    1 + max_retries times; in flight on one server at a time."""
    from openai import APIConnectionError, APIStatusError, APITimeoutError

    errors: list[tuple[str, str]] = []  # (server, kind) of each failed attempt
    server = None
    while True:
        server, sent_at = await fleet.acquire(avoid=server)
        try:
            # The SDK's untyped post (its documented way to custom requests): the same client,
            # auth, errors and timeouts, without chat.completions.create's per-request param
            # transform and response models, which cost ~2 ms of CPU per request; at 64 in
            # flight that, not the server, would cap throughput.
            raw = await clients[server.index].post(
                "/chat/completions",
                cast_to=bytes,
                body={"model": spec.model, "messages": request.messages, **request.sampling},
            )
        except APITimeoutError:
            error, kind, asked_wait = "APITimeoutError", "timeout", None
        except APIConnectionError as err:
            error, kind, asked_wait = type(err).__name__, "connection", None
        except APIStatusError as err:
            status = err.status_code
            error, asked_wait = f"HTTP {status}", retry_after(err.response)
            kind = "429" if status == 429 else "5xx" if status >= 500 else "4xx"
        except BaseException:
            fleet.rejected(server, sent_at)  # cancelled, or a bug here: not the server's doing
            raise
        else:
            latency = fleet.answered(server, sent_at)
            choice = json.loads(raw)["choices"][0]
            return Reply(
                choice["message"].get("content") or "",
                retries=len(errors),
                truncated=choice.get("finish_reason") == "length",
                server=server.name,
                latency_s=latency,
                errors=tuple(errors),
            )
        errors.append((server.name, kind))
        if kind == "4xx":
            fleet.rejected(server, sent_at)  # the server is fine; the request is not
            if error not in ("HTTP 408", "HTTP 409"):  # bad request: retrying will not help
                return Reply(None, len(errors) - 1, error, server=server.name, errors=tuple(errors))
        else:
            fleet.failed(server, sent_at, error, asked_wait)
        if len(errors) > spec.max_retries:
            return Reply(None, spec.max_retries, error, server=server.name, errors=tuple(errors))


def retry_after(response) -> float | None:
    """Seconds a 429 or 503 response asks the client to wait: `Retry-After` (seconds or an HTTP
    date) or OpenAI's `retry-after-ms`; None when it does not say."""
    import email.utils

    headers = getattr(response, "headers", None) or {}
    try:
        if headers.get("retry-after-ms") is not None:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        if value.strip().isdigit():
            return float(value)
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- vllm


VLLM_MISSING = (
    "vllm is not installed here (pip install vllm on a GPU machine), "
    "or serve the model with `vllm serve` and use kind: openai"
)


async def _vllm(
    spec: VllmTeacher, requests: list[Request], runtime: Runtime
) -> AsyncIterator[tuple[Request, Reply]]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise DataSynthError(VLLM_MISSING, "teacher.kind") from None
    llm = LLM(
        model=runtime.resolve(spec.model),
        tensor_parallel_size=spec.tensor_parallel_size,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        max_model_len=spec.max_model_len,
        dtype=spec.dtype,
        trust_remote_code=runtime.trust_remote_code,
        seed=runtime.seed,
        load_format="auto" if runtime.allow_pickle else "safetensors",
    )
    for start in range(0, len(requests), spec.batch_size):
        batch = requests[start : start + spec.batch_size]
        # a seed per request from its key: the same request gives the same sample on a rerun
        params = [SamplingParams(**r.sampling, seed=int(r.key[:8], 16)) for r in batch]
        outputs = await asyncio.to_thread(
            llm.chat, [r.messages for r in batch], params, use_tqdm=False
        )
        for request, output in zip(batch, outputs, strict=True):
            first = output.outputs[0]
            yield request, Reply(first.text, truncated=first.finish_reason == "length")


# --------------------------------------------------------------------------- transformers


async def _transformers(
    spec: TransformersTeacher, requests: list[Request], runtime: Runtime
) -> AsyncIterator[tuple[Request, Reply]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = runtime.resolve(spec.model)
    trust = runtime.trust_remote_code
    dtype = spec.dtype if spec.dtype == "auto" else getattr(torch, spec.dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust, padding_side="left"
        )
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=trust,
            use_safetensors=None if runtime.allow_pickle else True,
        ).to(spec.device)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataSynthError(f"cannot load {path}: {reason}", "teacher.model") from None
    model.eval()

    def generate(batch: list[Request]) -> list[str]:
        sampling = batch[0].sampling
        inputs = tokenizer.apply_chat_template(
            [r.messages for r in batch],
            add_generation_prompt=True,
            padding=True,
            return_tensors="pt",
            return_dict=True,
        )
        inputs = {k: v.to(spec.device) for k, v in inputs.items()}
        torch.manual_seed(int(batch[0].key[:8], 16))  # same batch, same samples on a rerun
        sample = sampling["temperature"] > 0
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=sampling["max_tokens"],
                do_sample=sample,
                temperature=sampling["temperature"] if sample else None,
                top_p=sampling.get("top_p") if sample else None,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        # a row that never produced eos within max_tokens was cut short (padding follows eos)
        ended = (new_tokens == tokenizer.eos_token_id).any(dim=1).tolist()
        cut = [
            not e and len(row) >= sampling["max_tokens"]
            for e, row in zip(ended, new_tokens, strict=True)
        ]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return list(zip(texts, cut, strict=True))

    # batch only requests with the same sampling settings: generate() takes one set per call
    by_sampling: dict[str, list[Request]] = {}
    for request in requests:
        by_sampling.setdefault(repr(sorted(request.sampling.items())), []).append(request)
    for group in by_sampling.values():
        for start in range(0, len(group), spec.batch_size):
            batch = group[start : start + spec.batch_size]
            answers = await asyncio.to_thread(generate, batch)
            for request, (text, cut) in zip(batch, answers, strict=True):
                yield request, Reply(text, truncated=cut)
