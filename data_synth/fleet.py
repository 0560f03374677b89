"""Which server of a teacher fleet gets the next request: the one owner of fleet policy.

Choice: the server with the least expected wait, (requests in flight + 1) x its latency, ties
broken by fewest sent, then by position in `base_urls`. With equal latencies this is plain
least-in-flight. The latency factor is there because a fleet's servers are rarely equal: under
plain least-in-flight the in-flight counts even out, so a server 10x slower than the rest holds
its share of the client's `concurrency` ten times as long (with two fast servers and one slow,
the fleet runs at 0.7x the two fast ones alone; bench/fleet.py measures it). A server's latency
is the moving average of its answers, or the age of its oldest request in flight when that is
longer: a server that stalls stops getting requests before its first timeout comes back.

Health: a connection error, timeout or 5xx marks a server down; it is tried again after an
exponential backoff (doubling per consecutive failure, capped), with one request at a time (a
probe) until one is answered, when it rejoins. A 429 (or 503) with Retry-After benches the server
for as long as it asked, and the others take its requests. When every server has been down for
longer than `give_up_after_s` (the caller's retry budget), `acquire` raises FleetDown naming each
server and its last error.

Single event loop, no locks: nothing here awaits between choosing a server and counting the
request on it, so two workers cannot both take the last free slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from data_synth.errors import DataSynthError

ERROR_KINDS = ("connection", "timeout", "429", "5xx", "4xx")
MAX_RETRY_AFTER_S = 600.0  # a server asking for longer is down, not busy: try it then anyway
EWMA = 0.3  # weight of the newest latency: a server that slows down is seen within a few replies


class FleetDown(DataSynthError):
    """Every server of the fleet has been down for longer than the retry budget."""


def public_url(url: str) -> str:
    """`url` without userinfo, query or fragment: what may be logged and stored (an API key
    can hide in `https://user:KEY@host` or in `?api_key=KEY`)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    if parts.port is not None:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass
class Server:
    index: int  # position in base_urls: the last tie-break
    name: str  # public_url of the server
    since: list[float] = field(default_factory=list)  # when each request in flight was sent
    sent: int = 0
    latency_s: float | None = None  # EWMA of answered requests; None until the first answer
    down: bool = False  # failed and not answered since: takes one probe at a time
    down_since: float = 0.0
    failures: int = 0  # consecutive failures (one per probe round): the backoff's exponent
    retry_at: float = 0.0  # after a failure: not before this (cleared by an answer)
    benched_until: float = 0.0  # after Retry-After: not before this (only time clears it)
    marked_at: float = -1.0  # when the last failure was counted: older requests do not escalate
    last_error: str | None = None

    @property
    def in_flight(self) -> int:
        return len(self.since)

    def free_at(self) -> float:
        return max(self.retry_at, self.benched_until)


class Fleet:
    """Health and load of each server, and the choice of the next one."""

    def __init__(
        self,
        urls: list[str],
        backoff_s: float,
        backoff_max_s: float,
        give_up_after_s: float,
        by_latency: bool = True,
    ):
        self.servers = [Server(i, public_url(url)) for i, url in enumerate(urls)]
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.give_up_after_s = give_up_after_s
        self.by_latency = by_latency  # False: plain least-in-flight (bench/fleet.py compares)
        self._changed = asyncio.Event()  # a server became free: waiting workers look again

    # ------------------------------------------------------------------ choice

    def _cost(self, server: Server, default_latency: float, now: float) -> tuple:
        latency = server.latency_s if server.latency_s is not None else default_latency
        if server.since:  # sent in order, answered in any: the first is the oldest
            latency = max(latency, now - server.since[0])
        expected = (server.in_flight + 1) * latency if self.by_latency else 0.0
        return (expected, server.in_flight, server.sent, server.index)

    def _pick(self, now: float, avoid: Server | None) -> Server | None:
        free = [
            s
            for s in self.servers
            if s.free_at() <= now and not (s.down and s.in_flight)  # a down server: one probe
        ]
        if len(free) > 1 and avoid in free:  # a retry goes to another server when there is one
            free.remove(avoid)
        if not free:
            return None
        known = [s.latency_s for s in self.servers if s.latency_s is not None]
        # a server not yet measured is taken to be as fast as the fleet's average
        default = sum(known) / len(known) if known else 1.0
        return min(free, key=lambda s: self._cost(s, default, now))

    async def acquire(self, avoid: Server | None = None) -> tuple[Server, float]:
        """The server for the next attempt, counted as in flight on it from the time returned
        with it (pass that to the outcome); waits while none is free. `avoid`: the server the
        request just failed on."""
        while True:
            now = time.monotonic()
            server = self._pick(now, avoid)
            if server is not None:
                server.since.append(now)
                server.sent += 1
                return server, now
            wake = min(s.free_at() for s in self.servers)
            if all(s.down for s in self.servers):
                deadline = max(s.down_since for s in self.servers) + self.give_up_after_s
                if now >= deadline:
                    raise FleetDown(self._down_message(now), "teacher.base_urls")
                wake = min(wake, deadline)
            self._changed.clear()
            # wake when a server's wait ends, or sooner if a reply frees one (a probe answered)
            timeout = wake - now if wake > now else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    def _down_message(self, now: float) -> str:
        since = now - max(s.down_since for s in self.servers)
        each = "; ".join(f"{s.name}: {s.last_error}" for s in self.servers)
        return (
            f"every teacher server has been down for {since:.1f}s, longer than the retry "
            f"budget ({self.give_up_after_s:.1f}s): {each}"
        )

    # ------------------------------------------------------------------ outcomes

    def answered(self, server: Server, sent_at: float) -> float:
        """The attempt sent at `sent_at` was answered; returns its latency."""
        latency_s = time.monotonic() - sent_at
        server.since.remove(sent_at)
        if server.latency_s is None:
            server.latency_s = latency_s
        else:
            server.latency_s += EWMA * (latency_s - server.latency_s)
        server.down, server.failures, server.retry_at = False, 0, 0.0  # it rejoins
        self._changed.set()
        return latency_s

    def rejected(self, server: Server, sent_at: float) -> None:
        """The attempt ended without saying anything against the server: it answered a 4xx
        (our request is at fault), or the attempt was cancelled."""
        server.since.remove(sent_at)
        self._changed.set()

    def failed(
        self, server: Server, sent_at: float, error: str, retry_after_s: float | None = None
    ) -> None:
        """An attempt sent at `sent_at` failed with `error` ("HTTP 503", "APIConnectionError")."""
        now = time.monotonic()
        server.since.remove(sent_at)
        server.last_error = error
        if retry_after_s is not None:
            # busy, not broken: away exactly as long as it asked (the others take its requests)
            server.benched_until = max(
                server.benched_until, now + min(retry_after_s, MAX_RETRY_AFTER_S)
            )
        elif sent_at >= server.marked_at:
            # a request sent before the last mark-down failed in the same outage: counting
            # every one of them would jump the backoff to its cap in one round
            server.failures += 1
            server.marked_at = now
            if not server.down:
                server.down, server.down_since = True, now
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** (server.failures - 1))
            # jitter, so that clients sharing a fleet do not probe it in lockstep
            server.retry_at = now + delay * random.uniform(0.5, 1.0)
        self._changed.set()


def retry_budget_s(backoff_s: float, backoff_max_s: float, max_retries: int) -> float:
    """How long one request waits over all its retries, backing off between them."""
    return sum(min(backoff_max_s, backoff_s * 2**k) for k in range(max_retries))
