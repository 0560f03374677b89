import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_recipe

from data_synth import echo_server
from data_synth.errors import DataSynthError
from data_synth.exchange import Request, Runtime
from data_synth.seeds import Problem
from data_synth.teachers import OpenAITeacher, stream
from upstack.core.errors import StageFailed
from upstack.core.recipe import load_recipe
from upstack.core.runner import run

PROBLEM = Problem(id="p", question="q", solution="s", answer="1", source="test")


def requests(count: int) -> list[Request]:
    return [
        Request(
            key=f"k{i}",
            task="rephrase_answer",
            sample=0,
            problem=PROBLEM,
            sampling={"temperature": 0.0, "max_tokens": 8},
            messages=[{"role": "user", "content": f"Problem:\nq{i}\n\nSolution:\nanswer {i}"}],
        )
        for i in range(count)
    ]


def collect(spec, reqs) -> list:
    async def go():
        return [item async for item in stream(spec, reqs, Runtime())]

    return asyncio.run(go())


@pytest.mark.slow
def test_openai_teacher_spreads_requests_over_the_fleet(tmp_path):
    logs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    with (
        echo_server.running(log=str(logs[0])) as url_a,
        echo_server.running(log=str(logs[1])) as url_b,
    ):
        spec = OpenAITeacher(model="echo", base_urls=[url_a, url_b], concurrency=4)
        replies = collect(spec, requests(20))
    assert sorted(reply.text for _, reply in replies) == sorted(f"answer {i}" for i in range(20))
    served = [len(log.read_text().splitlines()) for log in logs]
    assert sum(served) == 20 and min(served) >= 5  # both take a share; none is asked twice
    assert {reply.server for _, reply in replies} == {url_a, url_b}


@pytest.mark.slow
def test_openai_teacher_survives_a_flaky_endpoint(tmp_path):
    # 30% of completions fail: half with 503, half hang past the client's timeout
    with echo_server.running(fail_rate=0.3, hang_s=2.0, seed=1) as url:
        spec = OpenAITeacher(
            model="echo",
            base_urls=[url],
            concurrency=16,
            timeout_s=0.5,
            max_retries=10,
            backoff_s=0.02,
            backoff_max_s=0.2,
        )
        replies = collect(spec, requests(60))
    assert len(replies) == 60 and all(reply.text is not None for _, reply in replies)
    assert {request.key: reply.text for request, reply in replies} == {
        f"k{i}": f"answer {i}" for i in range(60)
    }
    assert sum(reply.retries for _, reply in replies) >= 10  # ~0.3/0.7 retries per request


def test_openai_teacher_waits_as_long_as_retry_after_says():
    """A hosted API that answers 429 with `Retry-After: 1` gets its second try after a second,
    not after the client's own backoff (10 ms here)."""
    import time

    with echo_server.running(retry_after_s=1) as url:
        spec = OpenAITeacher(
            model="echo", base_urls=[url], concurrency=8, max_retries=3, backoff_s=0.01
        )
        started = time.monotonic()
        replies = collect(spec, requests(8))
        waited = time.monotonic() - started
    assert {r.key: reply.text for r, reply in replies} == {f"k{i}": f"answer {i}" for i in range(8)}
    assert all(reply.retries == 1 for _, reply in replies)
    assert 1.0 <= waited < 5


def test_retry_after_reads_seconds_dates_and_milliseconds():
    import email.utils
    import time

    from data_synth.teachers import retry_after

    class Response:
        def __init__(self, **headers):
            self.headers = headers

    assert retry_after(Response(**{"retry-after": "7"})) == 7.0
    assert retry_after(Response(**{"retry-after-ms": "1500"})) == 1.5
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_after(Response(**{"retry-after": later})) <= 30
    assert (
        retry_after(Response()) is None and retry_after(Response(**{"retry-after": "soon"})) is None
    )


@pytest.mark.slow
def test_synth_through_a_flaky_endpoint_counts_retries(tmp_path):
    with echo_server.running(fail_rate=0.3, hang_s=2.0, seed=2) as url:
        path = write_recipe(
            tmp_path,
            f"""
            name: flaky
            output_dir: {tmp_path / "runs"}
            stages:
              synth:
                seeds: [{{source: arith, count: 30}}]
                teacher: {{kind: openai, model: echo, base_urls: ["{url}"], concurrency: 16,
                           timeout_s: 0.5, max_retries: 10, backoff_s: 0.02, backoff_max_s: 0.2}}
                augmentations: {{rephrase_question: 0, rephrase_answer: 1}}
        """,
        )
        run(load_recipe(path), ["synth"])
    stats = json.loads((tmp_path / "runs" / "synth" / "upstack.json").read_text())["metrics"]
    assert (
        stats["requests_sent"] == 30
        and stats["retries"] > 0
        and "request_failed" not in stats["dropped"]
    )
    assert stats["kept"] == 30  # the echo server returns the original solution: a correct answer
    # the manifest says which server answered what, and how often it failed on the way
    assert list(stats["servers"]) == [url] and stats["servers"][url]["answered"] == 30
    assert sum(stats["servers"][url]["errors"].values()) == stats["retries"]
    assert set(stats["servers"][url]["errors"]) <= {"5xx", "timeout"}


def test_missing_api_key_is_a_user_error(monkeypatch):
    monkeypatch.delenv("UPSTACK_TEST_KEY", raising=False)
    spec = OpenAITeacher(
        model="m", base_urls=["http://127.0.0.1:9/v1"], api_key_env="UPSTACK_TEST_KEY"
    )
    with pytest.raises(DataSynthError, match="UPSTACK_TEST_KEY is not set"):
        collect(spec, requests(1))


def test_vllm_teacher_without_vllm_is_a_user_error(tmp_path):
    from data_synth.teachers import VllmTeacher

    if "vllm" in sys.modules or any((Path(p) / "vllm").exists() for p in sys.path):
        pytest.skip("vllm is installed here")
    with pytest.raises(DataSynthError, match="vllm is not installed"):
        collect(VllmTeacher(model="org/model"), requests(1))


@pytest.mark.slow
def test_synth_against_transformers_serve(tmp_path, tiny_model):
    """The real thing: `transformers serve` on the tiny model, through the openai teacher. The
    random tiny model answers noise until max_tokens cuts it off: a reply cut short is no final
    answer, so none is cached and the stage fails, as it must rather than pass on an empty or
    truncated data set; every request was still sent and answered."""
    port = echo_server.free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "transformers"),
            "serve",
            str(tiny_model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        echo_server.wait_healthy(f"http://127.0.0.1:{port}/health", server, timeout=120)
        path = write_recipe(
            tmp_path,
            f"""
            name: served
            output_dir: {tmp_path / "runs"}
            stages:
              synth:
                seeds: [{{source: arith, count: 4}}]
                teacher: {{kind: openai, model: "{tiny_model}", base_urls: ["http://127.0.0.1:{port}/v1"],
                           concurrency: 4, timeout_s: 60, max_retries: 1}}
                augmentations: {{rephrase_question: 1, rephrase_answer: 1}}
                sampling: {{max_tokens: 16}}
        """,
        )
        with pytest.raises(StageFailed, match=r"teacher requests failed \(truncated at max_tokens"):
            run(load_recipe(path), ["synth"])
    finally:
        server.terminate()
        server.wait(10)
        log.close()
    failed = tmp_path / "runs" / ".upstack" / "work" / "synth" / "failed_requests.json"
    stats = json.loads(failed.read_text())
    assert stats["requests"] >= 8 and stats["requests_sent"] == stats["requests"]
    assert stats["request_errors"] == {"truncated at max_tokens": stats["requests_sent"]}
    assert stats["kept"] == 0
    served = (tmp_path / "serve.log").read_text().count('POST /v1/chat/completions HTTP/1.1" 200')
    assert served == stats["requests_sent"]
    assert not (tmp_path / "runs" / "synth").exists()


def test_transformers_teacher_generates_with_the_chat_template(tmp_path, tiny_model):
    from data_synth.teachers import TransformersTeacher

    runtime = Runtime()
    spec = TransformersTeacher(model=str(tiny_model), batch_size=3)
    reqs = [Request(**{**vars(r), "key": f"{i:032x}"}) for i, r in enumerate(requests(5))]
    sampled = [
        Request(
            key=f"{100 + i:032x}",
            task="solve",
            sample=i,
            problem=PROBLEM,
            sampling={"temperature": 0.8, "top_p": 0.9, "max_tokens": 6},
            messages=reqs[0].messages,
        )
        for i in range(2)
    ]

    async def go():
        return [item async for item in stream(spec, reqs + sampled, runtime)]

    replies = asyncio.run(go())
    assert sorted(r.key for r, _ in replies) == sorted(r.key for r in reqs + sampled)
    assert all(isinstance(reply.text, str) and reply.text for _, reply in replies)
    # the random model never says eos: every reply ran into max_tokens and says so
    assert all(
        reply.truncated and reply.unusable == "truncated at max_tokens" for _, reply in replies
    )
    again = dict((r.key, reply.text) for r, reply in asyncio.run(go()))
    assert again == {
        r.key: reply.text for r, reply in replies
    }  # greedy, and sampling seeded per batch
