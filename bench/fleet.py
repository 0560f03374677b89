"""Throughput of the openai teacher over a fleet of loopback servers, healthy and not.

    PYTHONPATH=src:. .venv/bin/python bench/fleet.py [--latency 0.04] [--requests 400] [--repeats 2]

Scenarios, each against the same two healthy servers (fixed latency) plus at most one more:
  2 healthy                    the reference rate
  + 1 slow (10x)               a third server ten times slower
  + 1 slow, least-in-flight    the same, choosing by in-flight count alone (the policy without
                               the latency factor, patched in here only: what it would cost)
  + 1 throttled (429)          a third server answering its first 3 requests 429, Retry-After: 1
  3, one killed + restarted    a third healthy server SIGKILLed a quarter in, restarted at once
For each: requests/s (best of --repeats, scenarios interleaved so each sees the machine's load
alike), the ratio to 2 healthy, and which server answered how many. Target: + 1 slow >= 0.8x.
Writes bench/out/fleet.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import threading
import time
from pathlib import Path

from data_synth import teachers
from data_synth.echo_server import EchoProcess
from data_synth.exchange import Request, Runtime
from data_synth.fleet import Fleet
from data_synth.rephrase import Tally
from data_synth.seeds import Problem
from upstack.core.tables import markdown_table

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PROBLEM = Problem(id="bench", question="q", solution="s", answer="1", source="bench")
CONCURRENCY = 8


def make_requests(count: int) -> list[Request]:
    return [
        Request(
            key=f"r{i}",
            task="rephrase_answer",
            sample=0,
            problem=PROBLEM,
            sampling={"temperature": 0.7, "top_p": 1.0, "max_tokens": 512},
            messages=[{"role": "user", "content": f"Problem:\nq{i}\n\nSolution:\nanswer {i}"}],
        )
        for i in range(count)
    ]


def measure(
    servers: dict[str, EchoProcess], count: int, kill: EchoProcess | None = None
) -> tuple[float, dict]:
    """Requests/s through the teacher over `servers`, and answered/errors per server role.
    `kill`: SIGKILLed after a quarter of the replies, restarted (in a thread) at once."""
    spec = teachers.OpenAITeacher(
        model="echo",
        base_urls=[s.url for s in servers.values()],
        concurrency=CONCURRENCY,
        timeout_s=10,
        max_retries=6,
        backoff_s=0.05,
        backoff_max_s=0.5,
    )
    tally = Tally()

    async def go() -> None:
        restart = None
        async for _, reply in teachers.stream(spec, make_requests(count), Runtime()):
            if reply.text is None:
                raise SystemExit(f"a request failed: {reply.error}")
            tally.count_reply(reply)
            if kill is not None and tally.sent == count // 4:
                kill.kill()
                restart = threading.Thread(target=kill.start)
                restart.start()
        if restart is not None:
            restart.join()

    started = time.perf_counter()
    asyncio.run(go())
    rps = count / (time.perf_counter() - started)
    metrics = tally.server_metrics()
    per_server = {
        name: {"answered": metrics[s.url]["answered"], "errors": metrics[s.url]["errors"]}
        for name, s in servers.items()
        if s.url in metrics
    }
    return rps, per_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.04, help="healthy server, seconds")
    parser.add_argument("--requests", type=int, default=400, help="per measurement")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    a, b = EchoProcess(latency=args.latency), EchoProcess(latency=args.latency)
    slow = EchoProcess(latency=args.latency, slow=10)
    busy = EchoProcess(latency=args.latency, throttle_first=3, retry_after_s=1)
    crash = EchoProcess(latency=args.latency)
    everyone = [a, b, slow, busy, crash]
    plain = functools.partial(Fleet, by_latency=False)
    scenarios = {  # name -> (servers by role, server to kill, Fleet class)
        "2 healthy": ({"a": a, "b": b}, None, Fleet),
        "+ 1 slow (10x)": ({"a": a, "b": b, "slow": slow}, None, Fleet),
        "+ 1 slow, least-in-flight": ({"a": a, "b": b, "slow": slow}, None, plain),
        "+ 1 throttled (429)": ({"a": a, "b": b, "busy": busy}, None, Fleet),
        "3, one killed + restarted": ({"a": a, "b": b, "crash": crash}, crash, Fleet),
    }
    best: dict[str, tuple[float, dict]] = {}
    try:
        for server in everyone:
            server.start()
        measure({"a": a, "b": b}, 100)  # warm-up: imports, code paths
        for _ in range(args.repeats):
            for name, (servers, kill, fleet) in scenarios.items():
                if busy in servers.values():
                    busy.restart()  # its first requests are throttled again
                teachers.Fleet = fleet  # the bench's one patch: the policy to compare
                try:
                    rps, counts = measure(servers, args.requests, kill)
                finally:
                    teachers.Fleet = Fleet
                if name not in best or rps > best[name][0]:
                    best[name] = (rps, counts)
    finally:
        for server in everyone:
            server.stop()

    reference = best["2 healthy"][0]
    results = [
        {
            "scenario": name,
            "rps": rps,
            "ratio": rps / reference,
            "servers": counts,
        }
        for name, (rps, counts) in best.items()
    ]

    def describe(counts: dict) -> str:
        parts = []
        for role, c in counts.items():
            errors = ", ".join(f"{kind} x{n}" for kind, n in c["errors"].items())
            parts.append(f"{role} {c['answered']}" + (f" ({errors})" if errors else ""))
        return "; ".join(parts)

    rows = [
        [r["scenario"], f"{r['rps']:.1f}", f"{r['ratio']:.2f}", describe(r["servers"])]
        for r in results
    ]
    print(
        f"openai teacher over a fleet: {CONCURRENCY} in flight, {1000 * args.latency:.0f} ms "
        f"servers, {args.requests} requests, best of {args.repeats}"
    )
    print(markdown_table(["scenario", "req/s", "vs 2 healthy", "answered per server"], rows))
    slow_ratio = best["+ 1 slow (10x)"][0] / reference
    print(f"target: + 1 slow >= 0.8x the 2 healthy servers ({slow_ratio:.2f}x)")

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fleet.json").write_text(
        json.dumps(
            {
                "python": sys.version.split()[0],
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg(),
                "latency_s": args.latency,
                "concurrency": CONCURRENCY,
                "requests": args.requests,
                "repeats": args.repeats,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {OUT / 'fleet.json'}")


if __name__ == "__main__":
    main()
