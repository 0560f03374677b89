"""A loopback OpenAI-compatible chat server with fixed latency and injected failures, for tests and benchmarks.

It answers /v1/chat/completions by echoing: the `Solution:` block of a prompt if there is one
(so a rephrase_answer request gets a correct answer), else the `Problem:` block. It is not a
model; it exercises the HTTP path: concurrency, latency, 5xx, timeouts, retries, resume.
Plain asyncio rather than a web framework, so that one core serves thousands of requests a
second and a benchmark measures the client, not the server.

    python -m data_synth.echo_server --port 8011 --latency 0.05 --fail-rate 0.3 --log served.jsonl

For fleet tests: `--slow 10` multiplies the latency; `--throttle-first K` / `--throttle-for-s S`
answer the first K completions (or those in the first S seconds) 429 with Retry-After; `EchoProcess`
starts one, kills it (SIGKILL, as a crash) and restarts it on the same port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def reply_text(messages: list[dict]) -> str:
    prompt = messages[-1]["content"] if messages else ""
    for label in ("Solution:", "Problem:"):
        if label in prompt:
            return prompt.split(label, 1)[1].strip()
    return prompt


class EchoServer:
    def __init__(
        self,
        latency: float,
        fail_rate: float,
        hang_s: float,
        log: str | None,
        seed: int,
        retry_after_s: float = 0.0,
        slow: float = 1.0,
        throttle_first: int = 0,
        throttle_for_s: float = 0.0,
    ):
        self.latency, self.fail_rate, self.hang_s = latency * slow, fail_rate, hang_s
        # retry_after_s > 0 alone: every request is first answered 429 with `Retry-After:
        # retry_after_s` (a busy hosted API), and only its retry is served. With throttle_first
        # (the first K completions) or throttle_for_s (those in the first S seconds) only those
        # are answered 429, with Retry-After: retry_after_s, or else the rest of the window.
        self.retry_after_s = retry_after_s
        self.throttle_first, self.throttle_for_s = throttle_first, throttle_for_s
        self.throttle_each = retry_after_s > 0 and not (throttle_first or throttle_for_s)
        self.started = time.monotonic()
        self.completions = 0  # chat requests received
        self.throttled: set[str] = set()
        self.rng = random.Random(seed)
        self.log = open(log, "a", buffering=1) if log else None  # noqa: SIM115 - lives as long as the server
        self.served = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
                length = (
                    int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
                    if b"ength:" in head
                    else 0
                )
                body = await reader.readexactly(length) if length else b""
                status, payload = await self.route(method, path, body)
                data = json.dumps(payload).encode()
                extra = b""
                if status == 429:
                    extra = b"Retry-After: %d\r\n" % math.ceil(payload.pop("retry_after"))
                    data = json.dumps(payload).encode()
                writer.write(
                    b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
                    % (status, extra, len(data), data)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass  # the client closed the connection (or gave up on a request that hung)
        finally:
            writer.close()

    def throttle(self, request: dict, number: int) -> float | None:
        """Seconds of Retry-After if this request (the `number`th completion) is to be answered
        429, else None."""
        if self.throttle_each:
            key = json.dumps(request["messages"], sort_keys=True)
            if key not in self.throttled:
                self.throttled.add(key)
                return self.retry_after_s
            return None
        if number <= self.throttle_first:
            return self.retry_after_s or 1.0
        left = self.throttle_for_s - (time.monotonic() - self.started)
        if left > 0:
            return self.retry_after_s or left
        return None

    async def route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if method == "GET" and path == "/health":
            return 200, {"status": "ok"}
        if method == "GET" and path.endswith("/models"):
            return 200, {"object": "list", "data": [{"id": "echo", "object": "model"}]}
        if method != "POST" or not path.endswith("/chat/completions"):
            return 404, {"error": {"message": f"no route {method} {path}"}}
        request = json.loads(body)
        self.completions += 1
        number = self.completions  # this request's: others arrive while it sleeps
        await asyncio.sleep(self.latency)
        wait = self.throttle(request, number)
        if wait is not None:
            error = {"message": "rate limited", "type": "rate_limit"}
            return 429, {"error": error, "retry_after": wait}
        roll = self.rng.random()
        if roll < self.fail_rate / 2:
            return 503, {"error": {"message": "injected failure", "type": "server_error"}}
        if roll < self.fail_rate:
            await asyncio.sleep(self.hang_s)  # longer than the client's timeout: it sees a timeout
        text = reply_text(request["messages"])
        self.served += 1
        if self.log:
            key = hashlib.sha256(
                json.dumps(request["messages"], sort_keys=True).encode()
            ).hexdigest()[:16]
            self.log.write(json.dumps({"messages": key, "t": time.time()}) + "\n")
        return 200, {
            "id": f"echo-{self.served}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", "echo"),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text},
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }


async def serve(port: int, **settings) -> None:
    server = EchoServer(**settings)
    # loopback only: a test server must never be reachable from outside the machine
    listener = await asyncio.start_server(server.handle, "127.0.0.1", port, backlog=1024)
    async with listener:
        await listener.serve_forever()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    """Poll GET url until it answers 200; fail early if the server process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


class EchoProcess:
    """An echo server in a separate process, on a port of its own that survives restarts: a test
    can kill it (SIGKILL, as a crash) and bring it back at the same URL. `settings` are
    EchoServer's (latency, slow, fail_rate, hang_s, log, seed, retry_after_s, throttle_first,
    throttle_for_s)."""

    def __init__(self, port: int | None = None, **settings):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.settings = settings
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        root = str(Path(__file__).resolve().parent.parent)
        pythonpath = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "data_synth.echo_server", "--port", str(self.port)]
        for name, value in self.settings.items():
            if value is not None:
                cmd += [f"--{name.replace('_', '-')}", str(value)]
        self.process = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": pythonpath})
        wait_healthy(f"http://127.0.0.1:{self.port}/health", self.process, timeout=30)
        return self.url

    def kill(self) -> None:
        """Die at once, requests in flight and all, as a crashed server does."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> str:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@contextlib.contextmanager
def running(
    latency: float = 0.0,
    fail_rate: float = 0.0,
    hang_s: float = 5.0,
    log: str | None = None,
    seed: int = 0,
    port: int | None = None,
    retry_after_s: float = 0.0,
    slow: float = 1.0,
    throttle_first: int = 0,
    throttle_for_s: float = 0.0,
) -> Iterator[str]:
    """An echo server in a separate process for the duration of a `with`; yields its base URL.
    `port` (default: a free one) lets a test stop a teacher and bring it back at the same URL."""
    server = EchoProcess(
        port,
        latency=latency,
        fail_rate=fail_rate,
        hang_s=hang_s,
        log=log,
        seed=seed,
        retry_after_s=retry_after_s,
        slow=slow,
        throttle_first=throttle_first,
        throttle_for_s=throttle_for_s,
    )
    try:
        yield server.start()
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds added to every completion"
    )
    parser.add_argument(
        "--fail-rate", type=float, default=0.0, help="share of completions that fail"
    )
    parser.add_argument(
        "--hang-s", type=float, default=5.0, help="how long a 'timeout' failure hangs"
    )
    parser.add_argument("--log", default=None, help="append one JSON line per answered completion")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--retry-after-s",
        type=float,
        default=0.0,
        help="answer each request 429 first, with Retry-After: this many seconds (or only "
        "those that --throttle-first or --throttle-for-s pick)",
    )
    parser.add_argument(
        "--slow", type=float, default=1.0, help="multiply --latency by this (a slow server)"
    )
    parser.add_argument(
        "--throttle-first", type=int, default=0, help="answer the first K completions 429"
    )
    parser.add_argument(
        "--throttle-for-s",
        type=float,
        default=0.0,
        help="answer completions in the first S seconds 429 (Retry-After: the rest of them)",
    )
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                args.port,
                latency=args.latency,
                fail_rate=args.fail_rate,
                hang_s=args.hang_s,
                log=args.log,
                seed=args.seed,
                retry_after_s=args.retry_after_s,
                slow=args.slow,
                throttle_first=args.throttle_first,
                throttle_for_s=args.throttle_for_s,
            )
        )


if __name__ == "__main__":
    main()
