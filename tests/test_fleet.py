"""The teacher fleet: which server gets a request, and what happens when servers die, slow down
or ask to be left alone (data_synth.fleet), against real echo servers over HTTP."""

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import write_recipe

from data_synth import echo_server
from data_synth.exchange import Request, Runtime
from data_synth.fleet import Fleet, FleetDown, public_url, retry_budget_s
from data_synth.rephrase import Tally
from data_synth.seeds import Problem
from data_synth.teachers import OpenAITeacher, stream
from upstack.core.errors import StageFailed
from upstack.core.recipe import load_recipe
from upstack.core.runner import run

PROBLEM = Problem(id="p", question="q", solution="s", answer="1", source="test")


def requests(count: int, offset: int = 0) -> list[Request]:
    return [
        Request(
            key=f"k{i}",
            task="rephrase_answer",
            sample=0,
            problem=PROBLEM,
            sampling={"temperature": 0.0, "max_tokens": 8},
            messages=[{"role": "user", "content": f"Problem:\nq{i}\n\nSolution:\nanswer {i}"}],
        )
        for i in range(offset, offset + count)
    ]


def start(servers: list[echo_server.EchoProcess]) -> None:
    """Side by side: each takes a second to import on a busy machine."""
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(echo_server.EchoProcess.start, servers))


def served(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# --------------------------------------------------------------------------- policy, no HTTP


async def take(fleet: Fleet, avoid=None):
    """The server the fleet picks (its send time is in server.since)."""
    server, _ = await fleet.acquire(avoid)
    return server


def test_least_in_flight_then_fewest_sent_then_index():
    async def go():
        fleet = Fleet(["http://a/v1", "http://b/v1", "http://c/v1"], 0.1, 1.0, 10.0)
        a, b, c = fleet.servers
        picks = [await take(fleet) for _ in range(4)]
        assert picks == [a, b, c, a]  # all idle: by index; then the fewest in flight
        fleet.answered(b, b.since[0])
        fleet.answered(c, c.since[0])
        b.latency_s = c.latency_s = 0.05  # as fast as each other
        # b and c idle, both sent one: index decides (b); then c has fewer in flight
        assert [await take(fleet), await take(fleet)] == [b, c]

    asyncio.run(go())


def test_a_slow_server_gets_fewer_requests_in_flight():
    """In flight x latency: a server 10x slower takes a request only when the others hold
    ten times as many."""

    async def go():
        fleet = Fleet(["http://fast/v1", "http://slow/v1"], 0.1, 1.0, 10.0)
        fast, slow = fleet.servers
        fast.latency_s, slow.latency_s = 0.1, 1.0
        picks = [await take(fleet) for _ in range(10)]
        assert picks == [fast] * 9 + [slow]

    asyncio.run(go())


def test_a_stalled_server_stops_getting_requests_before_its_timeout():
    """Its oldest request in flight is older than its usual latency: that age counts."""

    async def go():
        fleet = Fleet(["http://a/v1", "http://b/v1"], 0.1, 1.0, 10.0)
        a, b = fleet.servers
        a.latency_s = b.latency_s = 0.01
        assert await take(fleet) is a
        await asyncio.sleep(0.1)  # a's request hangs: 10x its latency
        picks = [await take(fleet) for _ in range(5)]
        assert picks == [b] * 5

    asyncio.run(go())


def test_a_failed_server_backs_off_takes_one_probe_and_rejoins():
    async def go():
        fleet = Fleet(["http://a/v1", "http://b/v1"], 0.2, 0.4, 10.0)
        a, b = fleet.servers
        assert await take(fleet) is a
        assert await take(fleet, avoid=b) is a  # a retry is steered away from where it failed
        first, second = a.since
        fleet.failed(a, first, "APIConnectionError")
        fleet.failed(a, second, "APIConnectionError")  # sent before the mark: same outage
        assert a.down and a.failures == 1 and 0.1 <= a.retry_at - time.monotonic() <= 0.2
        assert await take(fleet) is b  # a is backing off: b takes the request
        await asyncio.sleep(0.21)
        assert await take(fleet) is a  # the probe
        assert await take(fleet) is b  # one probe at a time, however idle a looks
        fleet.failed(a, a.since[0], "HTTP 503")  # the probe failed: twice the wait, capped
        assert a.failures == 2 and 0.2 <= a.retry_at - time.monotonic() <= 0.4
        await asyncio.sleep(0.41)
        assert await take(fleet) is a
        fleet.answered(a, a.since[0])
        assert not a.down and a.failures == 0  # answered: it rejoins

    asyncio.run(go())


def test_retry_after_benches_a_server_for_as_long_as_it_asked():
    async def go():
        fleet = Fleet(["http://a/v1", "http://b/v1"], 0.01, 0.01, 10.0)
        a, b = fleet.servers
        await take(fleet)
        fleet.failed(a, a.since[0], "HTTP 429", retry_after_s=0.3)
        assert not a.down  # busy, not broken
        started = time.monotonic()
        assert [await take(fleet) for _ in range(3)] == [b, b, b]
        b.benched_until = time.monotonic() + 10  # b benched too: the next waits for a
        assert await take(fleet) is a and time.monotonic() - started >= 0.29

    asyncio.run(go())


def test_every_server_down_past_the_retry_budget_names_each_and_its_error():
    async def go():
        urls = ["http://user:sk-SECRET@a:8000/v1", "http://b:8000/v1?api_key=sk-SECRET"]
        fleet = Fleet(urls, 0.05, 0.05, give_up_after_s=0.2)
        for error in ["APIConnectionError", "HTTP 503"]:
            server, sent_at = await fleet.acquire()
            fleet.failed(server, sent_at, error)
        started = time.monotonic()
        with pytest.raises(FleetDown) as down:
            while True:  # probes that keep failing, until the budget is spent
                server, sent_at = await fleet.acquire()
                fleet.failed(server, sent_at, server.last_error)
        assert 0.15 <= time.monotonic() - started < 1
        return str(down.value)

    message = asyncio.run(go())
    assert "\n" not in message and "user" not in message
    assert "http://a:8000/v1: APIConnectionError; http://b:8000/v1: HTTP 503" in message


def test_public_url_drops_userinfo_and_query():
    assert public_url("https://u:key@host.example:8443/v1?k=1#x") == "https://host.example:8443/v1"
    assert public_url("http://[::1]:8000/v1") == "http://[::1]:8000/v1"
    assert retry_budget_s(1.0, 60.0, 6) == 63.0 and retry_budget_s(1.0, 60.0, 0) == 0


# --------------------------------------------------------------------------- over HTTP


@pytest.mark.slow
def test_fleet_survives_a_crash_a_slow_server_and_a_429(tmp_path):
    """Three servers: `crash` is killed mid-run and restarted on its port, `slow` answers 10x
    slower, `busy` answers its first requests 429 with Retry-After: 1. Every request is answered
    exactly once, the crashed server rejoins, and the manifest's per-server counts add up."""
    latency, total = 0.03, 400
    logs = {name: tmp_path / f"{name}.jsonl" for name in ("crash", "slow", "busy")}
    crash = echo_server.EchoProcess(latency=latency, log=str(logs["crash"]))
    slow = echo_server.EchoProcess(latency=latency, slow=10, log=str(logs["slow"]))
    busy = echo_server.EchoProcess(
        latency=latency, throttle_first=3, retry_after_s=1, log=str(logs["busy"])
    )
    servers = [crash, slow, busy]
    spec = OpenAITeacher(
        model="echo",
        base_urls=[s.url for s in servers],
        concurrency=8,
        timeout_s=5,
        max_retries=6,
        backoff_s=0.05,
        backoff_max_s=0.2,
    )
    tally, replies = Tally(), []
    restarted_at = None

    async def go():
        nonlocal restarted_at
        async for request, reply in stream(spec, requests(total), Runtime()):
            replies.append((request, reply))
            tally.count_reply(reply)
            if len(replies) == 60:
                crash.kill()  # requests in flight on it fail; the fleet sends them elsewhere
            elif len(replies) == 100:
                await asyncio.to_thread(crash.start)  # same port: the same URL comes back
                restarted_at = time.time()

    try:
        start(servers)
        asyncio.run(go())
    finally:
        for server in servers:
            server.stop()

    # every request answered, once, with its own text
    assert sorted(r.key for r, _ in replies) == sorted(f"k{i}" for i in range(total))
    assert all(reply.text == f"answer {r.key[1:]}" for r, reply in replies)
    log = {name: served(path) for name, path in logs.items()}
    # a server logs a completion just before sending it: one killed in between answers a
    # request that is then retried elsewhere (a retry, never a duplicate in the output)
    assert total <= sum(len(lines) for lines in log.values()) <= total + tally.retries

    metrics = tally.server_metrics()
    assert set(metrics) == {s.url for s in servers}
    assert sum(m["answered"] for m in metrics.values()) == total == tally.sent
    for name, server in zip(logs, servers, strict=True):
        assert metrics[server.url]["answered"] <= len(log[name])
    assert metrics[crash.url]["errors"].get("connection", 0) >= 1  # the dead server's errors
    # it rejoined: not only probes, a full share of what was left
    after = sum(line["t"] > restarted_at for line in log["crash"])
    assert after >= 50, f"the restarted server answered {after} requests"
    assert metrics[busy.url]["errors"] == {"429": 3}
    answered = {name: metrics[s.url]["answered"] for name, s in zip(logs, servers, strict=True)}
    assert answered["slow"] < min(answered["crash"], answered["busy"])
    assert metrics[slow.url]["mean_latency_s"] > 5 * metrics[busy.url]["mean_latency_s"]
    assert sum(sum(m["errors"].values()) for m in metrics.values()) == tally.retries


def throughput(urls: list[str], count: int) -> float:
    spec = OpenAITeacher(model="echo", base_urls=urls, concurrency=8, max_retries=0)

    async def go() -> int:
        return sum(
            [reply.text is not None async for _, reply in stream(spec, requests(count), Runtime())]
        )

    started = time.perf_counter()
    assert asyncio.run(go()) == count
    return count / (time.perf_counter() - started)


@pytest.mark.slow
def test_a_slow_server_costs_the_fleet_little_throughput():
    """Two healthy servers vs the same two plus one 10x slower, measured side by side (best of
    two each, alternating, so both see the same load): the slow one may not hold the fleet back
    (plain least-in-flight would, at 0.7x: the slow server would keep a third of the workers)."""
    latency = 0.04
    servers = [echo_server.EchoProcess(latency=latency, slow=slow) for slow in (1, 1, 10)]
    try:
        start(servers)
        a, b, slow = (s.url for s in servers)
        throughput([a, b], 40)  # warm-up: imports and code paths
        two, three = [], []
        for _ in range(2):
            two.append(throughput([a, b], 200))
            three.append(throughput([a, b, slow], 200))
    finally:
        for server in servers:
            server.stop()
    ratio = max(three) / max(two)
    assert ratio >= 0.8, f"3 servers (one slow) {max(three):.0f} req/s vs 2 {max(two):.0f} req/s"


@pytest.mark.slow
def test_synth_fails_in_one_line_when_the_whole_fleet_is_down(tmp_path):
    dead = [echo_server.free_port(), echo_server.free_port()]  # nothing listens there
    # (a URL with credentials is refused at load: tests/test_corpus.py's key-in-url)
    urls = [f"http://127.0.0.1:{dead[0]}/v1", f"http://127.0.0.1:{dead[1]}/v1"]
    path = write_recipe(
        tmp_path,
        f"""
        name: down
        output_dir: {tmp_path / "runs"}
        stages:
          synth:
            seeds: [{{source: arith, count: 10}}]
            teacher: {{kind: openai, model: echo, base_urls: {json.dumps(urls)}, concurrency: 4,
                       max_retries: 3, backoff_s: 0.05, backoff_max_s: 0.1, timeout_s: 0.5}}
    """,
    )
    started = time.monotonic()
    with pytest.raises(StageFailed) as failed:
        run(load_recipe(path), ["synth"])
    assert time.monotonic() - started < 20
    message = str(failed.value)
    assert "\n" not in message
    assert "stages.synth.teacher: every teacher server has been down for" in message
    assert (
        f"http://127.0.0.1:{dead[0]}/v1: APIConnectionError; "
        f"http://127.0.0.1:{dead[1]}/v1: APIConnectionError" in message
    )
    stats = json.loads(
        (tmp_path / "runs" / ".upstack" / "work" / "synth" / "failed_requests.json").read_text()
    )
    assert all(set(s["errors"]) == {"connection"} for s in stats["servers"].values())


def test_echo_server_throttles_the_first_k_or_a_window():
    body = json.dumps({"messages": [{"role": "user", "content": "Problem:\nq"}]}).encode()

    async def statuses(server: echo_server.EchoServer, count: int) -> list:
        calls = [server.route("POST", "/v1/chat/completions", body) for _ in range(count)]
        return [
            (status, payload.get("retry_after")) for status, payload in await asyncio.gather(*calls)
        ]

    first = echo_server.EchoServer(0.01, 0, 0, None, 0, retry_after_s=2, throttle_first=2)
    assert asyncio.run(statuses(first, 4)) == [(429, 2), (429, 2), (200, None), (200, None)]

    window = echo_server.EchoServer(0.0, 0, 0, None, 0, throttle_for_s=0.3)
    [(status, wait)] = asyncio.run(statuses(window, 1))
    assert status == 429 and 0 < wait <= 0.3  # Retry-After: the rest of the window
    time.sleep(0.3)
    assert asyncio.run(statuses(window, 1)) == [(200, None)]
