"""``make bench``: the gateway against its limits, in one run on one machine.

Starts the fake OpenRouter, a fresh PostgreSQL database (SQLite if no server
answers), the site under uvicorn with N workers, and a load generator (wrk
when installed, else ``benchmarks.loadgen``), then prints a table:

* the fake upstream alone (the limit) and an empty async Django view under the
  same server (Django's own ceiling here);
* through the proxy, with all of its work on (key check, credit gate,
  in-flight bound, usage recording): requests/s and streams/s at 50
  connections, latency at 1 and 50 connections and what the proxy adds to it,
  time to first byte of a stream and what the proxy adds to it;
* database statements per request before and after the upstream call;
* memory of the server processes with many streams open at once.

``--short`` runs every step briefly: CI uses it to prove the benchmark works.
Nothing here asserts anything about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import loadgen

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SERVER_KEY = "sk-or-bench-not-a-real-key"
CHAT = {"model": "x-ai/grok-code-fast-1", "messages": [{"role": "user", "content": "Hi there"}]}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
PG = {"host": "127.0.0.1", "port": "5432", "user": "postgres"}


@dataclass
class Measured:
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int


def site_command(port: int, workers: int | None = None) -> list[str]:
    """uvicorn serving the site; ``workers=None`` runs one process without a supervisor."""
    command = [PYTHON, "-m", "uvicorn", "terragon.asgi:application", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--no-access-log", "--log-level", "warning"]
    if workers is not None:
        command += ["--workers", str(workers)]
    return command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def postgres_available() -> bool:
    if not shutil.which("psql"):
        return False
    probe = subprocess.run(
        ["psql", "-h", PG["host"], "-U", PG["user"], "-d", "postgres", "-qAtc", "select 1"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@contextmanager
def fresh_database() -> Iterator[str]:
    if postgres_available():
        name = f"bench_{os.getpid()}_{int(time.time())}"
        psql = ["psql", "-h", PG["host"], "-U", PG["user"], "-d", "postgres", "-qc"]
        subprocess.run([*psql, f"CREATE DATABASE {name}"], check=True)
        try:
            yield f"postgres://{PG['user']}@{PG['host']}:{PG['port']}/{name}?pool_max_size=20"
        finally:
            subprocess.run([*psql, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"], check=False)
    else:
        print("!! no PostgreSQL on 127.0.0.1:5432: benchmarking on SQLite instead")
        with tempfile.TemporaryDirectory() as folder:
            yield f"sqlite:///{folder}/bench.sqlite3"


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def children_of(pid: int) -> list[int]:
    found = [pid]
    with suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            found += children_of(int(child))
    return found


class Bench:
    def __init__(self, args: argparse.Namespace, database_url: str) -> None:
        self.args = args
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "benchmarks.settings",
            "DATABASE_URL": database_url,
            "OPENROUTER_API_KEY": SERVER_KEY,
            "DJANGO_SECRET_KEY": "bench-secret-key-not-for-production",
            "TERRAGON_API_KEY_PEPPER": "bench-pepper",
            "LOG_LEVEL": args.log_level,
            "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="bench-metrics-"),
            "PYTHONUNBUFFERED": "1",
        }
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
        self.wrk = shutil.which("wrk") if not args.no_wrk else None

    def start(self, name: str, command: list[str], port: int) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=log)
        self.processes.append(process)
        wait_for(port)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()

    def manage(self, *arguments: str) -> str:
        done = subprocess.run(
            [PYTHON, "manage.py", *arguments],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            check=True,
        )
        return done.stdout.decode()

    def prepare(self) -> list[str]:
        self.manage("migrate", "--verbosity", "0")
        script = (
            "import django; django.setup()\n"
            "from decimal import Decimal\n"
            "from django.contrib.auth import get_user_model\n"
            "from billing.services import grant_credits\n"
            "from terragon.apikeys.models import ApiKey\n"
            f"for n in range({self.args.users}):\n"
            "    user = get_user_model().objects.create_user(username=f'bench{n}')\n"
            "    grant_credits(user, Decimal(1000000), note='benchmark credit')\n"
            "    print(ApiKey.objects.issue(user, name='bench')[1])\n"
        )
        done = subprocess.run(
            [PYTHON, "-c", script], cwd=ROOT, env=self.env, capture_output=True, check=True
        )
        return done.stdout.decode().split()

    # --- load --------------------------------------------------------------------

    def load(
        self,
        url: str,
        body: Mapping[str, Any] | None,
        connections: int,
        tokens: list[str],
        bearer: str = "",
    ) -> Measured:
        """Load ``url``: daemon tokens rotate per request; ``bearer`` is for the fake."""
        duration = self.args.duration
        payload = json.dumps(body) if body is not None else ""
        if self.wrk:
            env = {
                **self.env,
                "BENCH_BODY": payload,
                "BENCH_TOKENS": ",".join(tokens),
                "BENCH_BEARER": bearer,
            }
            threads = str(min(2, connections))
            done = subprocess.run(
                [
                    self.wrk,
                    "-t",
                    threads,
                    "-c",
                    str(connections),
                    "-d",
                    f"{max(1, round(duration))}s",
                    "--timeout",
                    "30s",
                    "-s",
                    str(ROOT / "benchmarks/wrk/post.lua"),
                    url,
                ],
                env=env,
                capture_output=True,
                check=True,
            )
            line = re.search(rb"WRK_RESULT (\{.*\})", done.stdout)
            if line is None:
                raise RuntimeError(done.stdout.decode() + done.stderr.decode())
            result = json.loads(line.group(1))
            return Measured(
                rate=result["requests"] / (result["duration_us"] / 1e6),
                p50_ms=result["p50_us"] / 1000,
                p99_ms=result["p99_us"] / 1000,
                errors=result["errors"],
            )
        headers = {"Content-Type": "application/json"}
        if tokens:
            headers["X-Daemon-Token"] = tokens[0]
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        outcome = asyncio.run(
            loadgen.run_load(
                url, payload.encode() if body is not None else None, headers, connections, duration
            )
        )
        return Measured(
            outcome.rate, outcome.p50 * 1000, outcome.percentile(0.99) * 1000, outcome.errors
        )

    def ttfb_ms(self, url: str, tokens: list[str], bearer: str = "") -> float:
        headers = {"Content-Type": "application/json"}
        if tokens:
            headers["X-Daemon-Token"] = tokens[0]
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        samples = asyncio.run(
            loadgen.time_to_first_byte(url, json.dumps(STREAM).encode(), headers, self.args.samples)
        )
        samples.sort()
        return samples[len(samples) // 2] * 1000

    def memory_with_streams(
        self, url: str, server: subprocess.Popen[bytes], tokens: list[str]
    ) -> tuple[int, int, int, int]:
        """(open streams, completed with 200, RSS idle in KiB, RSS with them open)."""
        count = self.args.streams
        before = rss_kib(children_of(server.pid))
        # Spread the streams so no user exceeds the in-flight bound.
        per_user = max(1, -(-count // len(tokens)))
        hold = 2.0 if self.args.short else 8.0
        chunks = 16
        mode = f"chunks={chunks},chunk-delay={hold / chunks:.3f}"
        body = json.dumps(STREAM).encode()

        async def run() -> tuple[int, int]:
            tasks = [
                asyncio.create_task(
                    loadgen.hold_stream(
                        url,
                        body,
                        {
                            "Content-Type": "application/json",
                            "X-Fake-Mode": mode,
                            "X-Daemon-Token": tokens[(index // per_user) % len(tokens)],
                        },
                    )
                )
                for index in range(count)
            ]
            await asyncio.sleep(hold / 2)
            peak = rss_kib(children_of(server.pid))
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return sum(result is True for result in results), peak

        succeeded, peak = asyncio.run(run())
        return count, succeeded, before, peak


def measure_litellm(bench: Bench, row: Any, fake_base_url: str, connections: int) -> None:
    """The gateway users would otherwise pick, against the same fake, in the same run."""
    from benchmarks.litellm import VERSION, litellm_url, start_litellm

    port = free_port()
    process = start_litellm(fake_base_url, port, bench.logs, SERVER_KEY)
    if process is None:
        return
    bench.processes.append(process)
    url = litellm_url(port)
    row(
        f"LiteLLM proxy {VERSION}, one worker, no database",
        bench.load(url, CHAT, connections, []),
        bench.load(url, STREAM, connections, []),
        bench.load(url, CHAT, 1, []),
    )
    process.send_signal(signal.SIGINT)


def run_statement_count(env: dict[str, str]) -> str:
    done = subprocess.run(
        [PYTHON, "-m", "benchmarks.statements"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        return f"(could not count: {done.stderr.decode().strip().splitlines()[-1:]})"
    return done.stdout.decode().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="brief runs (CI)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=300, help="requests for TTFB medians")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--no-wrk", action="store_true", help="use the Python load generator")
    parser.add_argument(
        "--no-litellm", action="store_true", help="leave out LiteLLM's proxy (installed once)"
    )
    args = parser.parse_args()
    if args.short:
        args.duration, args.connections, args.streams = 1.0, 10, 40
        args.samples, args.users = 20, 10
        args.no_litellm = True

    with fresh_database() as database_url:
        bench = Bench(args, database_url)
        try:
            report(bench, database_url)
        finally:
            bench.stop()


def report(bench: Bench, database_url: str) -> None:
    args = bench.args
    tokens = bench.prepare()
    fake_port, proxy_port = free_port(), free_port()
    bench.start(
        "fake", [PYTHON, "manage.py", "fake_openrouter", "--port", str(fake_port)], fake_port
    )
    bench.env["OPENROUTER_BASE_URL"] = f"http://127.0.0.1:{fake_port}/api"
    server = bench.start("proxy", site_command(proxy_port, args.workers), proxy_port)
    fake = f"http://127.0.0.1:{fake_port}/api/v1/chat/completions"
    proxy = f"http://127.0.0.1:{proxy_port}/api/proxy/openrouter/v1/chat/completions"
    empty = f"http://127.0.0.1:{proxy_port}/bench/empty"
    c = args.connections

    # Warm every worker's connection pools before measuring.
    bench.load(proxy, CHAT, c, tokens)

    rows: list[tuple[str, str, str, str, str]] = []

    def row(
        name: str,
        non_stream: Measured | None,
        stream: Measured | None,
        single: Measured | None,
        extra: str = "",
    ) -> None:
        rows.append(
            (
                name,
                f"{non_stream.rate:,.0f}" if non_stream else "—",
                f"{stream.rate:,.0f}" if stream else "—",
                f"{single.p50_ms:.2f} / {single.p99_ms:.2f}" if single else "—",
                extra,
            )
        )

    fake_json = bench.load(fake, CHAT, c, [], SERVER_KEY)
    fake_stream = bench.load(fake, STREAM, c, [], SERVER_KEY)
    fake_one = bench.load(fake, CHAT, 1, [], SERVER_KEY)
    row("fake upstream alone (the limit)", fake_json, fake_stream, fake_one)

    empty_many = bench.load(empty, None, c, [])
    empty_one = bench.load(empty, None, 1, [])
    row(
        f"empty async Django view (site stack), {args.workers} workers", empty_many, None, empty_one
    )

    proxy_json = bench.load(proxy, CHAT, c, tokens)
    proxy_stream = bench.load(proxy, STREAM, c, tokens)
    proxy_one = bench.load(proxy, CHAT, 1, tokens)
    proxy_stream_one = bench.load(proxy, STREAM, 1, tokens)
    fake_stream_one = bench.load(fake, STREAM, 1, [], SERVER_KEY)
    row(
        f"the proxy, {args.workers} workers",
        proxy_json,
        proxy_stream,
        proxy_one,
        f"{proxy_json.errors + proxy_stream.errors} errors",
    )

    if not args.no_litellm:
        measure_litellm(bench, row, f"http://127.0.0.1:{fake_port}/api", c)

    ttfb_fake = bench.ttfb_ms(fake, [], SERVER_KEY)
    ttfb_proxy = bench.ttfb_ms(proxy, tokens)
    streams = bench.memory_with_streams(proxy, server, tokens)
    # The same with one server process: no supervisor, no resource tracker.
    single_port = free_port()
    single = bench.start("proxy-single", site_command(single_port), single_port)
    single_url = f"http://127.0.0.1:{single_port}/api/proxy/openrouter/v1/chat/completions"
    bench.load(single_url, CHAT, c, tokens)  # warm it like the others
    streams_single = bench.memory_with_streams(single_url, single, tokens)
    statements = run_statement_count({**bench.env, "OPENROUTER_BASE_URL": ""})

    header = ("", f"req/s at {c} conn.", f"streams/s at {c}", "p50 / p99 ms at 1 conn.", "")
    width = [max(len(r[i]) for r in [*rows, header]) for i in range(5)]
    print()
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, "
        f"database {'PostgreSQL' if database_url.startswith('postgres') else 'SQLite'}, "
        f"load generator {'wrk' if bench.wrk else 'benchmarks.loadgen'}, "
        f"{args.duration:g} s per run, {c} connections"
    )
    for line in (header, *rows):
        print("  ".join(cell.ljust(width[i]) for i, cell in enumerate(line)))
    print()
    print(
        "Added latency, non-streaming:  p50 "
        f"{proxy_one.p50_ms - fake_one.p50_ms:.2f} ms at 1 connection, "
        f"{proxy_json.p50_ms - fake_json.p50_ms:.2f} ms at {c}"
    )
    print(
        "Added latency, streaming:      p50 "
        f"{proxy_stream_one.p50_ms - fake_stream_one.p50_ms:.2f} ms "
        f"at 1 connection (whole stream)"
    )
    print(
        f"Time to first byte of a stream: fake {ttfb_fake:.2f} ms, proxy {ttfb_proxy:.2f} ms "
        f"(+{ttfb_proxy - ttfb_fake:.2f} ms)"
    )
    print(f"Database statements per request: {statements}")
    for label, (count, succeeded, before, peak) in (
        (f"{args.workers} workers + supervisor", streams),
        ("one server process", streams_single),
    ):
        print(
            f"Memory, {label}: {count} streams open at once ({succeeded} completed with 200): "
            f"RSS {before / 1024:.0f} MiB idle, {peak / 1024:.0f} MiB with them open "
            f"({(peak - before) / count:.0f} KiB per stream)"
        )


if __name__ == "__main__":
    main()
