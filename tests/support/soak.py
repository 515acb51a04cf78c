"""A bounded load driver for soak runs against the proxy, on loopback.

It sends a fixed number of requests with a fixed mix, chosen by a seeded
shuffle so that two runs with the same seed send the same requests:

* about 85 % ordinary requests (JSON and streams, chat and legacy
  completions, several upstream shapes),
* 10 % client disconnects (a stream left after its first bytes),
* 5 % upstream failures (5xx answers, streams cut or ended by an error).

The upstream must be the fake OpenRouter (behaviour is chosen with its
``X-Fake-Mode`` header). Every run stops by itself: after ``requests``
requests, or when ``deadline`` seconds have passed, whichever comes first.

The soak test (``tests/system/test_soak.py``) drives it; it also runs on its own
against a server you started, e.g.::

    python -m tests.support.soak --url http://127.0.0.1:3000 --token tg_... --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

CHAT_PATH = "/api/proxy/openrouter/v1/chat/completions"
COMPLETIONS_PATH = "/api/proxy/openrouter/v1/completions"


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    group: str  # "ok", "disconnect" or "failure"
    mode: str
    stream: bool
    path: str = CHAT_PATH
    model: str = "x-ai/grok-code-fast-1"


OK_KINDS = (
    Kind("json", "ok", "chunks=3", False),
    Kind("stream", "ok", "chunks=4", True),
    Kind("stream-usage-on-finish", "ok", "usage-on-finish,exp-cost", True),
    Kind("stream-crlf-keepalive", "ok", "crlf,keepalive=3", True),
    Kind("json-gzip", "ok", "gzip", False),
    Kind("json-cached", "ok", "cached=2,reasoning=3", False, model="qwen/qwen3-coder:exacto"),
    Kind("completions", "ok", "chunks=2", False, COMPLETIONS_PATH, "z-ai/glm-4.6"),
    Kind("completions-stream", "ok", "chunks=2", True, COMPLETIONS_PATH, "z-ai/glm-4.6"),
)
DISCONNECT = Kind("disconnect", "disconnect", "chunks=30,chunk-delay=0.02", True)
FAILURE_KINDS = (
    Kind("upstream-502", "failure", "status=502", False),
    Kind("upstream-503", "failure", "status=503", True),
    Kind("upstream-500", "failure", "status=500", False),
    Kind("stream-cut", "failure", "cut", True),
    Kind("stream-midstream-error", "failure", "midstream-error", True),
)


def plan(
    requests: int, seed: int = 1, disconnects: float = 0.10, failures: float = 0.05
) -> list[Kind]:
    """The kinds of ``requests`` requests, in a seeded random order."""
    n_disconnects = round(requests * disconnects)
    n_failures = round(requests * failures)
    kinds: list[Kind] = [DISCONNECT] * n_disconnects
    kinds += [FAILURE_KINDS[i % len(FAILURE_KINDS)] for i in range(n_failures)]
    kinds += [OK_KINDS[i % len(OK_KINDS)] for i in range(requests - len(kinds))]
    random.Random(seed).shuffle(kinds)
    return kinds


@dataclass
class Outcome:
    kind: Kind
    status: int
    seconds: float
    error: str = ""


@dataclass
class SoakResult:
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed: float = 0.0
    stopped_by_deadline: bool = False

    def count(self, **where: Any) -> int:
        return sum(
            1
            for o in self.outcomes
            if all(getattr(o.kind, k, getattr(o, k, None)) == v for k, v in where.items())
        )

    @property
    def statuses(self) -> Counter[int]:
        return Counter(o.status for o in self.outcomes)

    @property
    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error]

    def latency(self, quantile: float) -> float:
        values = sorted(o.seconds for o in self.outcomes if o.kind.group == "ok")
        if not values:
            return 0.0
        return values[min(len(values) - 1, int(quantile * len(values)))]

    def summary(self) -> dict[str, Any]:
        done = len(self.outcomes)
        return {
            "requests": done,
            "seconds": round(self.elapsed, 1),
            "per_second": round(done / self.elapsed, 1) if self.elapsed else 0,
            "ok": self.count(group="ok"),
            "disconnects": self.count(group="disconnect"),
            "upstream_failures": self.count(group="failure"),
            "statuses": dict(sorted(self.statuses.items())),
            "client_errors": len(self.errors),
            "p50_ms": round(self.latency(0.5) * 1000, 1),
            "p99_ms": round(self.latency(0.99) * 1000, 1),
            "mean_ms": round(statistics.fmean([o.seconds for o in self.outcomes] or [0]) * 1000, 1),
        }


async def _one(client: httpx.AsyncClient, token: str, kind: Kind, index: int) -> Outcome:
    body: dict[str, Any] = {"model": kind.model, "stream": kind.stream, "metadata": {"i": index}}
    if kind.path == COMPLETIONS_PATH:
        body["prompt"] = f"Say hi #{index}"
    else:
        body["messages"] = [{"role": "user", "content": f"Hello #{index}"}]
    headers = {"X-Daemon-Token": token, "X-Fake-Mode": kind.mode}
    started = time.monotonic()
    try:
        async with client.stream("POST", kind.path, json=body, headers=headers) as response:
            if kind.group == "disconnect" and response.status_code == 200:
                pieces = response.aiter_raw()
                await pieces.__anext__()
                await pieces.__anext__()
                # Leaving the block unread closes the connection: a client gone.
            else:
                await response.aread()
            return Outcome(kind, response.status_code, time.monotonic() - started)
    except httpx.HTTPError as error:
        return Outcome(kind, 0, time.monotonic() - started, f"{type(error).__name__}: {error}")


async def run(
    base_url: str,
    tokens: Sequence[str],
    kinds: Sequence[Kind],
    concurrency: int = 32,
    deadline: float = 600.0,
    offset: int = 0,
) -> SoakResult:
    """Send ``kinds`` (one request each) with ``concurrency`` at once; bounded by ``deadline``."""
    result = SoakResult()
    queue: asyncio.Queue[tuple[int, Kind]] = asyncio.Queue()
    for index, kind in enumerate(kinds, start=offset):
        queue.put_nowait((index, kind))
    stop_at = time.monotonic() + deadline
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(60.0, connect=10.0)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            while not queue.empty():
                if time.monotonic() > stop_at:
                    result.stopped_by_deadline = True
                    return
                index, kind = queue.get_nowait()
                result.outcomes.append(await _one(client, tokens[index % len(tokens)], kind, index))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed = time.monotonic() - started
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:3000")
    parser.add_argument("--token", action="append", required=True, help="repeat for more users")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds at most")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        parser.error("the soak driver only talks to loopback")
    kinds = plan(args.requests, args.seed)
    result = asyncio.run(run(args.url, args.token, kinds, args.concurrency, args.deadline))
    for name, value in result.summary().items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
