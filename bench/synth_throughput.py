"""Throughput of the openai teacher against a loopback server with fixed latency, next to the ideal.

    .venv/bin/python bench/synth_throughput.py [--latency 0.05 0.5] [--concurrency 1 8 64] [--seconds 3]

For each latency and concurrency: requests/s measured vs the ideal concurrency / latency, and the
client's CPU time per request (this process only; the server runs in another). Beside the teacher,
the same requests through a bare httpx client (the HTTP library under the openai SDK) at the
highest concurrency: the floor any Python client on this machine pays. Targets: >= 90% of ideal at
64 in flight, < 2 ms client CPU per request. Writes bench/out/synth_throughput.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from data_synth import echo_server
from data_synth.exchange import Request, Runtime
from data_synth.seeds import Problem
from data_synth.teachers import OpenAITeacher, stream
from upstack.core.tables import markdown_table

ROOT = Path(__file__).resolve().parent.parent

OUT = ROOT / "bench" / "out"
PROBLEM = Problem(id="bench", question="q", solution="s", answer="1", source="bench")


def make_requests(count: int, offset: int) -> list[Request]:
    content = "Problem:\nA question of typical length for a math word problem, a sentence or two long.\n\n"
    content += "Solution:\nA worked solution of a few steps. " * 8
    return [
        Request(
            key=f"r{offset + i}",
            task="rephrase_answer",
            sample=0,
            problem=PROBLEM,
            sampling={"temperature": 0.7, "top_p": 1.0, "max_tokens": 512},
            messages=[{"role": "user", "content": f"{content}#{offset + i}"}],
        )
        for i in range(count)
    ]


async def through_teacher(url: str, concurrency: int, count: int) -> int:
    spec = OpenAITeacher(model="echo", base_urls=[url], concurrency=concurrency, max_retries=0)
    answered = 0
    async for _, reply in stream(spec, make_requests(count, 0), Runtime()):
        answered += reply.text is not None
    return answered


async def through_httpx(url: str, concurrency: int, count: int) -> int:
    """The floor: the same POSTs with httpx (openai's own HTTP library), no SDK, no retries."""
    import httpx2 as httpx  # what openai>=3 depends on

    pending, answered = iter(make_requests(count, 0)), 0
    async with httpx.AsyncClient(
        base_url=url, limits=httpx.Limits(max_connections=concurrency)
    ) as client:

        async def worker() -> None:
            nonlocal answered
            for request in pending:
                body = {"model": "echo", "messages": request.messages, **request.sampling}
                response = await client.post("/chat/completions", json=body)
                answered += (
                    json.loads(response.content)["choices"][0]["message"]["content"] is not None
                )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answered


def measure(client, url: str, concurrency: int, count: int) -> dict:
    asyncio.run(client(url, concurrency, min(count, 200)))  # warm-up: imports, code paths
    cpu, wall = time.process_time(), time.perf_counter()
    answered = asyncio.run(client(url, concurrency, count))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "concurrency": concurrency,
        "requests": count,
        "answered": answered,
        "seconds": wall,
        "rps": count / wall,
        "cpu_ms_per_request": 1000 * cpu / count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--latency",
        type=float,
        nargs="+",
        default=[0.05, 0.5],
        help="server seconds per request (an LLM takes seconds: 0.5 is still fast)",
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="ideal duration of each measurement"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    args = parser.parse_args()

    results = []
    for latency in args.latency:
        with echo_server.running(latency=latency) as url:
            runs = [("openai teacher", through_teacher, c) for c in args.concurrency]
            runs.append(("bare httpx", through_httpx, max(args.concurrency)))
            for name, client, concurrency in runs:
                ideal = concurrency / latency
                result = measure(
                    client, url, concurrency, count=max(concurrency, int(ideal * args.seconds))
                )
                results.append(
                    {
                        "client": name,
                        "latency_s": latency,
                        **result,
                        "ideal_rps": ideal,
                        "of_ideal": result["rps"] / ideal,
                    }
                )

    rows = [
        [
            f"{1000 * r['latency_s']:.0f}",
            r["client"],
            r["concurrency"],
            r["requests"],
            f"{r['rps']:.1f}",
            f"{r['ideal_rps']:.1f}",
            f"{100 * r['of_ideal']:.1f}%",
            f"{r['cpu_ms_per_request']:.2f}",
        ]
        for r in results
    ]
    print("openai teacher vs a loopback echo server with a fixed latency per request")
    print(
        markdown_table(
            [
                "latency ms",
                "client",
                "in flight",
                "requests",
                "req/s",
                "ideal req/s",
                "of ideal",
                "client CPU ms/req",
            ],
            rows,
        )
    )
    for r in results:
        if r["client"] == "openai teacher" and r["concurrency"] == 64:
            print(
                f"target at 64 in flight, {1000 * r['latency_s']:.0f} ms: >= 90% of ideal "
                f"({100 * r['of_ideal']:.1f}%), < 2 ms client CPU per request ({r['cpu_ms_per_request']:.2f} ms)"
            )

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "synth_throughput.json").write_text(
        json.dumps(
            {
                "python": sys.version.split()[0],
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg(),
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for latency in args.latency:
        mine = [r for r in results if r["latency_s"] == latency and r["client"] == "openai teacher"]
        xs = [r["concurrency"] for r in mine]
        line = ax.plot(
            xs, [r["rps"] for r in mine], "o-", label=f"openai teacher, {1000 * latency:.0f} ms"
        )
        ax.plot(xs, [r["ideal_rps"] for r in mine], "--", color=line[0].get_color(), label="ideal")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="requests in flight",
        ylabel="requests / s",
        title="openai teacher vs ideal (concurrency / latency)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "synth_throughput.png", dpi=120)
    print(f"wrote {OUT / 'synth_throughput.json'} and .png")


if __name__ == "__main__":
    main()
