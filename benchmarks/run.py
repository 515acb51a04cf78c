"""``make bench``: the gateway against its peers and its limits, in one run on one machine.

Every server is measured in turn against its own fresh fake OpenRouter (the
same code and settings each time), on loopback only, with the same load:

* **the fake alone**: the floor every "added" figure is measured against;
* **nginx**, two workers, a plain reverse proxy in front of the fake: the
  practical limit of any proxy hop here (``benchmarks.nginx``);
* **us**: the site under uvicorn with two workers on a fresh PostgreSQL
  database (SQLite only if no server answers), with everything production
  does on: key check, credit gate, in-flight bound, usage recording, one log
  line per request;
* **LiteLLM**'s proxy with the same number of workers, no database
  (``benchmarks.litellm``);
* **Portkey**'s gateway, one Node process (``benchmarks.portkey``).

Workloads, for each server:

* tiny requests: JSON and streamed at 50 connections (requests/s and
  streams/s), and JSON at one connection (p50 and p99, and what the server
  adds over the fake alone);
* agent prompts: one request at a time with a 100 KB and a 400 KB body and a
  JSON answer, so the figure is what the prompt itself costs (p50 and p99 and
  the added time);
* the agent fleet: 200, 500 and 1,000 agents streaming turns for a fixed time
  (30 KB prompts, answers of 50 chunks 40 ms apart): turns/s, p50 and p99 of a
  turn and what the server adds, errors, and the peak memory of all the
  server's processes (sampled), hence the memory per open stream.

wrk generates the request loads (with ``benchmarks/wrk/post.lua``;
``benchmarks.loadgen`` when wrk is missing), ``benchmarks.fleet`` the fleet.
The output is a set of Markdown tables, the ratios between us and each peer,
and the targets of the performance issue with a pass or fail mark each.

``--short`` runs everything briefly, with the peers that can be had without a
network (LiteLLM only if installed already, Portkey from npm's cache): CI uses
it to prove the benchmark works, and it asserts nothing about speed. A peer
that cannot be had is reported and left out, never a failure. ``--profile``
also records one of our workers with py-spy under tiny requests and under
400 KB prompts, after our measured runs, and prints where the time went.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from benchmarks import fleet, loadgen
from benchmarks.profile import summarise

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SERVER_KEY = "sk-or-bench-not-a-real-key"
MODEL = "x-ai/grok-code-fast-1"
PG = {"host": "127.0.0.1", "port": "5432", "user": "postgres"}
FLEET_MODE = "chunks=50,chunk-delay=0.04"
FLEET_PROMPT = 30_000
PROMPTS = (100_000, 400_000)
SERVER_ORDER = ("fake", "nginx", "portkey", "us", "litellm")
TOOLS = ROOT / "var" / "bench-tools" / "venv"
PY_SPY = TOOLS / "bin" / "py-spy"
PROFILE_RATE = 250
T = TypeVar("T")


# --------------------------------------------------------------------------- bodies


def tiny(stream: bool) -> bytes:
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi there"}],
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body).encode()


def prompt(size: int, stream: bool) -> bytes:
    """A chat request of ``size`` bytes, shaped like a coding agent's.

    A system prompt, then turns of a conversation whose contents are source
    code (quotes, backslashes, newlines and some non-ASCII text, so a JSON
    decoder has escapes to undo), with the last user message padded to the size.
    """
    code = (
        'def handler(request: "Request") -> dict[str, str]:\n'
        '    """Answer with the path, escaped: \\\\n stays literal."""\n'
        '    return {"path": request.path, \'note\': "naïve café — ok"}\n\n'
    )
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "You are a coding agent. Use the tools. " * 20}
    ]
    body: dict[str, object] = {"model": MODEL, "messages": messages}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    turn = 0
    while len(json.dumps(body).encode()) < size * 0.8:
        role = "user" if turn % 2 == 0 else "assistant"
        messages.append({"role": role, "content": f"File {turn}:\n" + code * 10})
        turn += 1
    messages.append({"role": "user", "content": ""})
    missing = size - len(json.dumps(body).encode())
    messages[-1]["content"] = ("x" * 63 + "\n") * (missing // 65) + "x" * (missing % 65)
    encoded = json.dumps(body).encode()
    return encoded + b" " * max(0, size - len(encoded))


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a load generator on uvloop when it is installed: less of the CPU it shares."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


# --------------------------------------------------------------------------- processes


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


def children_of(pid: int) -> list[int]:
    found = [pid]
    with suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            found += children_of(int(child))
    return found


def rss_kib(pid: int) -> int:
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    """The process's proportional set size: each page shared with others counted in part.

    Summed over a server's processes it is the memory the server takes: RSS
    counts every shared page (the interpreter's code, the libraries, what a
    forked worker shares with its parent) once in each process.
    """
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def cmdline(pid: int) -> str:
    with suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def worker_pids(root: int) -> list[int]:
    """The processes that serve requests: the root's descendants, or the root alone."""
    tree = children_of(root)
    workers = [pid for pid in tree[1:] if "resource_tracker" not in cmdline(pid)]
    return workers or [root]


def cpu_seconds(root: int) -> float:
    """CPU time used so far by a process tree (user and system)."""
    ticks = 0
    for pid in children_of(root):
        with suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def settle(root: int, minimum: float, maximum: float) -> None:
    """Wait until a server is idle (under 5% of a core over half a second), within limits.

    A gateway may still be working off turns the fleet gave up on: the next
    measurement must not pay for them.
    """
    time.sleep(minimum)
    deadline = time.monotonic() + maximum
    while time.monotonic() < deadline:
        before = cpu_seconds(root)
        time.sleep(0.5)
        if cpu_seconds(root) - before < 0.025:
            return


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Sampler:
    """Samples the RSS of a process tree (all of it, and each worker) and its PSS, in a thread."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root = root
        self.interval = interval
        self.peak_kib = 0
        self.worker_peak_kib = 0
        self.pss_peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int]:
        tree = children_of(self.root)
        total = sum(rss_kib(pid) for pid in tree)
        workers = worker_pids(self.root)
        worker = max((rss_kib(pid) for pid in workers), default=0)
        self.peak_kib = max(self.peak_kib, total)
        self.worker_peak_kib = max(self.worker_peak_kib, worker)
        self.pss_peak_kib = max(self.pss_peak_kib, sum(pss_kib(pid) for pid in tree))
        return total, worker

    def reset(self) -> tuple[int, int]:
        """Start a new window; returns the current (total, largest worker) RSS in KiB."""
        self.peak_kib = self.worker_peak_kib = self.pss_peak_kib = 0
        return self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- results


@dataclass
class Measured:
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int


@dataclass
class FleetFigures:
    concurrency: int
    rate: float
    p50_s: float
    p99_s: float
    errors: int
    error_kinds: dict[str, int]
    idle_kib: int
    peak_kib: int
    worker_idle_kib: int
    worker_peak_kib: int
    workers: int
    #: The peak of the summed PSS (shared pages counted once in all).
    pss_peak_kib: int = 0
    #: Time to the response's head (before the stream), p50 and p99.
    head_p50_s: float = float("nan")
    head_p99_s: float = float("nan")

    @property
    def kib_per_stream(self) -> float:
        return (self.peak_kib - self.idle_kib) / self.concurrency

    @property
    def worker_kib_per_stream(self) -> float:
        return (self.worker_peak_kib - self.worker_idle_kib) / (self.concurrency / self.workers)


@dataclass
class Results:
    label: str
    json50: Measured | None = None
    stream50: Measured | None = None
    json1: Measured | None = None
    prompts: dict[int, Measured] = field(default_factory=dict)
    fleets: dict[int, FleetFigures] = field(default_factory=dict)
    missing: str = ""


@dataclass
class Target:
    """One server under load: where to send, with which headers."""

    key: str
    label: str
    url: str
    process: subprocess.Popen[bytes]
    headers: dict[str, str] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)
    fleet_headers: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args: argparse.Namespace, database_url: str) -> None:
        self.args = args
        self.database_url = database_url
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "terragon.settings",
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
        self.bodies: dict[str, Path] = {}
        for name, body in (
            ("json", tiny(False)),
            ("stream", tiny(True)),
            *((f"prompt{size}", prompt(size, False)) for size in PROMPTS),
            ("fleet", prompt(FLEET_PROMPT, True)),
        ):
            path = self.logs / f"{name}.json"
            path.write_bytes(body)
            self.bodies[name] = path
        self.tokens: list[str] = []

    def start(self, name: str, command: list[str], port: int) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=log)
        self.processes.append(process)
        wait_for(port)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_process(process)

    def prepare(self) -> None:
        subprocess.run(
            [PYTHON, "manage.py", "migrate", "--verbosity", "0"],
            cwd=ROOT,
            env=self.env,
            check=True,
            capture_output=True,
        )
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
        self.tokens = done.stdout.decode().split()

    def start_fake(self) -> int:
        port = free_port()
        self.start("fake", [PYTHON, "manage.py", "fake_openrouter", "--port", str(port)], port)
        return port

    # --- load --------------------------------------------------------------------

    def load(
        self, target: Target, body: str, connections: int, duration: float | None = None
    ) -> Measured:
        duration = self.args.duration if duration is None else duration
        if self.wrk:
            env = {
                **self.env,
                "BENCH_BODY_FILE": str(self.bodies[body]),
                "BENCH_TOKENS": ",".join(target.tokens),
                "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in target.headers.items()),
            }
            command = [self.wrk, "-t", str(min(2, connections)), "-c", str(connections)]
            command += ["-d", f"{max(1, round(duration))}s", "--timeout", "30s"]
            command += ["-s", str(ROOT / "benchmarks/wrk/post.lua"), target.url]
            done = subprocess.run(command, env=env, capture_output=True, check=True)
            line = re.search(rb"WRK_RESULT (\{.*\})", done.stdout)
            if line is None:
                raise RuntimeError(done.stdout.decode() + done.stderr.decode())
            result = json.loads(line.group(1))
            # wrk counts a non-2xx answer as a request (and a status error):
            # the rate is of good answers only.
            good = result["requests"] - result["status_errors"]
            return Measured(
                rate=good / (result["duration_us"] / 1e6),
                p50_ms=result["p50_us"] / 1000,
                p99_ms=result["p99_us"] / 1000,
                errors=result["errors"],
                requests=result["requests"],
            )
        headers = {"Content-Type": "application/json", **target.headers}
        outcome = run_async(
            loadgen.run_load(
                target.url,
                self.bodies[body].read_bytes(),
                headers,
                connections,
                duration,
                tokens=list(target.tokens),
            )
        )
        return Measured(
            outcome.rate,
            outcome.p50 * 1000,
            outcome.percentile(0.99) * 1000,
            outcome.errors,
            outcome.requests,
        )

    def run_fleet(self, target: Target, concurrency: int, duration: float) -> fleet.FleetResult:
        """``concurrency`` agents streaming turns through ``target`` for ``duration`` seconds."""
        body = self.bodies["fleet"].read_bytes()
        base = {"Content-Type": "application/json", "X-Fake-Mode": FLEET_MODE}
        base |= target.headers | target.fleet_headers
        tokens = target.tokens

        def headers_for(index: int) -> dict[str, str]:
            if tokens:
                return {**base, "X-Daemon-Token": tokens[index % len(tokens)]}
            return base

        return run_async(
            fleet.run_fleet(
                target.url,
                body,
                headers_for,
                concurrency,
                duration,
                ramp=min(1.0, duration / 10),
                drain=self.args.fleet_drain,
            )
        )

    def profiled_fleet(self, target: Target, concurrency: int, seconds: float) -> None:
        """A fleet for the profile: its first turns' ramp, then ``seconds`` of steady turns."""
        self.run_fleet(target, concurrency, seconds + 2)

    def fleet(
        self, target: Target, concurrency: int, sampler: Sampler, idle: tuple[int, int]
    ) -> FleetFigures:
        """One fleet run; ``idle`` is the (total, largest worker) RSS before the first one."""
        sampler.reset()
        idle_kib, worker_idle = idle
        outcome = self.run_fleet(target, concurrency, self.args.fleet_duration)
        sampler.sample()
        figures = FleetFigures(
            concurrency=concurrency,
            rate=outcome.rate,
            p50_s=outcome.percentile(0.5),
            p99_s=outcome.percentile(0.99),
            errors=outcome.error_count,
            error_kinds=dict(outcome.errors) | {"unfinished": outcome.unfinished},
            idle_kib=idle_kib,
            peak_kib=sampler.peak_kib,
            worker_idle_kib=worker_idle,
            worker_peak_kib=sampler.worker_peak_kib,
            workers=len(worker_pids(target.process.pid)),
            pss_peak_kib=sampler.pss_peak_kib,
            head_p50_s=outcome.percentile(0.5, outcome.heads),
            head_p99_s=outcome.percentile(0.99, outcome.heads),
        )
        settle(target.process.pid, 0.5 if self.args.short else 1.0, self.args.fleet_drain)
        return figures

    def measure(self, target: Target) -> Results:
        args = self.args
        results = Results(target.label)
        c = args.connections
        print(f"-- measuring {target.label}", flush=True)
        settle(target.process.pid, 0.0, 15.0)  # done starting up
        with Sampler(target.process.pid) as sampler:
            self.load(target, "json", c, args.warmup)  # warm pools and caches
            results.json50 = self.load(target, "json", c)
            results.stream50 = self.load(target, "stream", c)
            # Idle first: the one-connection figures are of an idle server, not of
            # one still working off the streams before (records, collections).
            settle(target.process.pid, 0.5, 15.0)
            results.json1 = self.load(target, "json", 1)
            # The fleet before the big prompts: the memory it measures is not
            # what a 400 KB body left behind (the fake also keeps recent bodies).
            idle = sampler.reset()
            for concurrency in args.fleet:
                results.fleets[concurrency] = self.fleet(target, concurrency, sampler, idle)
            for size in PROMPTS:
                if not args.short:
                    self.load(target, f"prompt{size}", 1, 1)  # warm
                results.prompts[size] = self.load(target, f"prompt{size}", 1)
        return results

    def profile(self, target: Target) -> str:
        """py-spy on our workers under tiny requests, 400 KB prompts, then the fleet.

        Every worker is recorded (a single connection sticks to one of them)
        and the busiest one is summarised; the raw samples stay in ``var/``.
        The fleet is the first of ``--fleet`` sizes, run for as long as the others.
        """
        failure = install_py_spy()
        if failure:
            return f"(no profile: {failure})"
        workers = worker_pids(target.process.pid)
        seconds = self.args.profile_duration
        summaries = []
        workloads: list[tuple[str, Callable[[], object]]] = [
            ("tiny", lambda: self.load(target, "json", self.args.connections, seconds + 1)),
            ("400k", lambda: self.load(target, f"prompt{PROMPTS[-1]}", 1, seconds + 1)),
        ]
        if self.args.fleet:
            fleet_size = self.args.fleet[0]
            workloads.append(
                (f"fleet{fleet_size}", lambda: self.profiled_fleet(target, fleet_size, seconds))
            )
        for name, run in workloads:
            spies = []
            for worker in workers:
                raw = ROOT / "var" / f"profile-{name}-{worker}.txt"
                command = [str(PY_SPY), "record", "--nonblocking", "--gil", "--format", "raw"]
                command += ["--rate", str(PROFILE_RATE), "--duration", str(max(1, round(seconds)))]
                command += ["--pid", str(worker), "--output", str(raw)]
                spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                spies.append((worker, raw, spy))
            time.sleep(0.5)
            run()
            recorded = []
            for worker, raw, spy in spies:
                _, error = spy.communicate(timeout=60)
                if spy.returncode == 0 and raw.exists():
                    text = raw.read_text()
                    samples = sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines())
                    recorded.append((samples, worker, raw, text))
                else:
                    summaries.append(f"(py-spy failed on {worker}: {error.decode()[-300:]})")
            if recorded:
                _, worker, raw, text = max(recorded)
                summaries.append(
                    f"Profile of the busiest worker (pid {worker}), {name} workload, "
                    f"{seconds:g} s ({raw.relative_to(ROOT)}):\n"
                    + summarise(text, possible=round(PROFILE_RATE * seconds))
                )
        return "\n\n".join(summaries)


def install_py_spy() -> str:
    """py-spy from PyPI into ``var/bench-tools/`` (once); what went wrong, or ""."""
    if PY_SPY.exists():
        return ""
    print(f"-- installing py-spy into {TOOLS} (once)")
    for step in (
        [PYTHON, "-m", "venv", str(TOOLS)],
        [str(TOOLS / "bin" / "python"), "-m", "pip", "install", "--quiet", "py-spy"],
    ):
        done = subprocess.run(step, capture_output=True, check=False)
        if done.returncode != 0:
            return f"could not install py-spy: {done.stderr.decode().strip()[-300:]}"
    return ""


# --------------------------------------------------------------------------- servers


def site_command(port: int, workers: int) -> list[str]:
    command = [PYTHON, "-m", "uvicorn", "terragon.asgi:application", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--no-access-log", "--log-level", "warning"]
    return [*command, "--workers", str(workers)]


def fake_target(bench: Bench, fake_port: int) -> Target:
    return Target(
        "fake",
        "the fake upstream alone",
        f"http://127.0.0.1:{fake_port}/api/v1/chat/completions",
        bench.processes[-1],
        headers={"Authorization": f"Bearer {SERVER_KEY}"},
    )


def nginx_target(bench: Bench, fake_port: int) -> Target | str:
    from benchmarks.nginx import start_nginx

    port = free_port()
    process = start_nginx(fake_port, port, bench.args.workers, bench.logs)
    if process is None:
        return "not installed or did not start (Debian package `nginx`)"
    bench.processes.append(process)
    return Target(
        "nginx",
        f"nginx, {bench.args.workers} workers, plain reverse proxy (the practical limit)",
        f"http://127.0.0.1:{port}/api/v1/chat/completions",
        process,
        headers={"Authorization": f"Bearer {SERVER_KEY}"},
    )


def us_target(bench: Bench, fake_port: int) -> Target | str:
    bench.env["OPENROUTER_BASE_URL"] = f"http://127.0.0.1:{fake_port}/api"
    port = free_port()
    process = bench.start("us", site_command(port, bench.args.workers), port)
    return Target(
        "us",
        f"**us**, {bench.args.workers} workers, full billing on",
        f"http://127.0.0.1:{port}/api/proxy/openrouter/v1/chat/completions",
        process,
        tokens=bench.tokens,
    )


def litellm_target(bench: Bench, fake_port: int) -> Target | str:
    from benchmarks import litellm

    if bench.args.short and not litellm.installed():
        return f"not installed in {litellm.VENV} (short mode installs nothing from PyPI)"
    port = free_port()
    process = litellm.start_litellm(
        f"http://127.0.0.1:{fake_port}/api", port, bench.logs, SERVER_KEY, bench.args.workers
    )
    if process is None:
        return "could not be installed or started (see the line above)"
    bench.processes.append(process)
    return Target(
        "litellm",
        f"LiteLLM {litellm.VERSION}, {bench.args.workers} workers, no database",
        litellm.litellm_url(port),
        process,
    )


def portkey_target(bench: Bench, fake_port: int) -> Target | str:
    from benchmarks import portkey

    port = free_port()
    fake_base = f"http://127.0.0.1:{fake_port}/api"
    process = portkey.start_portkey(
        fake_base, port, bench.logs, SERVER_KEY, offline=bench.args.short
    )
    if process is None:
        return "could not be installed or started (see the line above)"
    bench.processes.append(process)
    return Target(
        "portkey",
        f"Portkey gateway {portkey.VERSION}, one Node process, no auth or billing",
        portkey.portkey_url(port),
        process,
        headers=portkey.portkey_headers(fake_base, SERVER_KEY),
        fleet_headers={"x-portkey-forward-headers": "x-fake-mode"},
    )


STARTERS: dict[str, Callable[[Bench, int], Target | str]] = {
    "nginx": nginx_target,
    "us": us_target,
    "litellm": litellm_target,
    "portkey": portkey_target,
}
LABELS = {
    "fake": "the fake upstream alone",
    "nginx": "nginx (the practical limit)",
    "us": "**us**",
    "litellm": "LiteLLM",
    "portkey": "Portkey gateway",
}


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


def run_statement_count(env: dict[str, str]) -> str:
    done = subprocess.run(
        [PYTHON, "-m", "benchmarks.statements"],
        cwd=ROOT,
        env={**env, "OPENROUTER_BASE_URL": ""},
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        return f"(could not count: {done.stderr.decode().strip().splitlines()[-1:]})"
    return done.stdout.decode().strip()


# --------------------------------------------------------------------------- report


def _num(value: float, digits: int = 0) -> str:
    return "—" if math.isnan(value) else f"{value:,.{digits}f}"


def _ms(value: float) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:,.0f}"


def _added(value: float) -> str:
    return "—" if math.isnan(value) else ("+" if value >= 0 else "-") + _ms(abs(value))


def _mb(kib: int) -> str:
    return f"{kib * 1024 / 1e6:,.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


NAN = float("nan")


class Report:
    def __init__(self, results: dict[str, Results], args: argparse.Namespace) -> None:
        self.results = results
        self.args = args
        self.fake = results.get("fake")

    def measured(self) -> list[Results]:
        return [self.results[key] for key in SERVER_ORDER if key in self.results]

    def tables(self) -> list[str]:
        args = self.args
        fake = self.fake
        lines: list[str] = []
        c = args.connections
        rows = []
        for result in self.measured():
            if result.missing:
                rows.append([result.label, f"left out: {result.missing}", "", "", "", ""])
                continue
            assert result.json50
            assert result.stream50
            assert result.json1
            one = result.json1
            added = "—"
            if fake and fake.json1 and result is not fake:
                added = f"{_added(one.p50_ms - fake.json1.p50_ms)} / "
                added += _added(one.p99_ms - fake.json1.p99_ms)
            errors = result.json50.errors + result.stream50.errors + one.errors
            rows.append(
                [
                    result.label,
                    _num(result.json50.rate),
                    _num(result.stream50.rate),
                    f"{_ms(one.p50_ms)} / {_ms(one.p99_ms)}",
                    added,
                    str(errors),
                ]
            )
        lines += ["**Tiny requests** (a one-line chat completion):", ""]
        lines += _table(
            [
                "",
                f"req/s, {c} conn.",
                f"streams/s, {c} conn.",
                "p50 / p99 ms, 1 conn.",
                "added p50 / p99 ms",
                "errors",
            ],
            rows,
        )
        rows = []
        for result in self.measured():
            if result.missing:
                continue
            row = [result.label]
            for size in PROMPTS:
                got = result.prompts[size]
                if got.requests <= got.errors:
                    row += ["none served", "—"]
                    continue
                row.append(f"{_ms(got.p50_ms)} / {_ms(got.p99_ms)}")
                if fake and result is not fake:
                    base = fake.prompts[size]
                    row.append(
                        f"{_added(got.p50_ms - base.p50_ms)} / {_added(got.p99_ms - base.p99_ms)}"
                    )
                else:
                    row.append("—")
            row.append(str(sum(result.prompts[size].errors for size in PROMPTS)))
            rows.append(row)
        lines += ["", "**Agent prompts** (one at a time, 1 conn., JSON answers):", ""]
        header = [""]
        for size in PROMPTS:
            header += [f"{size // 1000} KB p50 / p99 ms", "added p50 / p99 ms"]
        header.append("errors")
        lines += _table(header, rows)
        rows = []
        for concurrency in args.fleet:
            floor = fake.fleets.get(concurrency) if fake else None
            for result in self.measured():
                if result.missing:
                    continue
                turns = result.fleets[concurrency]
                share = f" ({100 * turns.rate / floor.rate:.0f}%)" if floor and floor.rate else ""
                added = "—"
                if floor and result is not fake:
                    added = f"{_added(1000 * (turns.p50_s - floor.p50_s))} / "
                    added += _added(1000 * (turns.p99_s - floor.p99_s))
                rows.append(
                    [
                        f"{concurrency:,}",
                        result.label,
                        f"{_num(turns.rate)}{share}",
                        f"{_num(turns.p50_s, 2)} / {_num(turns.p99_s, 2)}",
                        added,
                        f"{_ms(1000 * turns.head_p50_s)} / {_ms(1000 * turns.head_p99_s)}",
                        str(turns.errors),
                        _mb(turns.peak_kib),
                        _mb(turns.pss_peak_kib),
                        "—" if math.isnan(turns.p50_s) else f"{turns.kib_per_stream:,.0f}",
                    ]
                )
        lines += [
            "",
            f"**Agent fleet** (concurrent streamed turns for {args.fleet_duration:g} s: "
            f"{FLEET_PROMPT // 1000} KB prompts, 50 chunks 40 ms apart by the fake's clock; "
            "to the head: until the response's status and headers):",
            "",
        ]
        lines += _table(
            [
                "turns",
                "",
                "turns/s (of the fake's)",
                "p50 / p99 s",
                "added p50 / p99 ms",
                "to the head p50 / p99 ms",
                "errors",
                "peak RSS MB",
                "peak PSS MB",
                "KiB / stream",
            ],
            rows,
        )
        return lines

    def details(self) -> list[str]:
        lines = []
        for result in self.measured():
            for concurrency, got in result.fleets.items():
                kinds = {kind: n for kind, n in got.error_kinds.items() if n}
                if kinds:
                    lines.append(f"- errors of {result.label} at {concurrency}: {kinds}")
        us = self.results.get("us")
        if us and not us.missing and us.fleets:
            parts = [
                f"{n:,} streams: {_mb(f.peak_kib)} MB in all (PSS {_mb(f.pss_peak_kib)} MB), "
                "the largest worker "
                f"{_mb(f.worker_idle_kib)} → {_mb(f.worker_peak_kib)} MB, "
                f"{f.kib_per_stream:,.0f} KiB per stream in all and "
                f"{f.worker_kib_per_stream:,.0f} KiB per stream in a worker"
                for n, f in us.fleets.items()
            ]
            first = next(iter(us.fleets.values()))
            lines.append(
                f"- Memory of us (all processes: supervisor, {first.workers} workers and "
                f"helpers; {_mb(first.idle_kib)} MB before the fleet): " + "; ".join(parts)
            )
        return lines

    def ratio(self, ours: float, theirs: float) -> str:
        if math.isnan(ours) or math.isnan(theirs) or not theirs:
            return "—"
        return f"{ours / theirs:.2f}x"

    def ratios(self) -> list[str]:
        us = self.results.get("us")
        if not us or us.missing:
            return []
        lines = []
        for key in ("litellm", "portkey", "nginx"):
            peer = self.results.get(key)
            if not peer:
                continue
            if peer.missing:
                lines.append(f"- us vs {LABELS[key]}: not measured ({peer.missing})")
                continue
            assert us.json50
            assert us.stream50
            assert peer.json50
            assert peer.stream50
            parts = [
                f"req/s {self.ratio(us.json50.rate, peer.json50.rate)}",
                f"streams/s {self.ratio(us.stream50.rate, peer.stream50.rate)}",
            ]
            for concurrency, ours in us.fleets.items():
                theirs = peer.fleets[concurrency]
                if math.isnan(theirs.p50_s):
                    parts.append(f"turns/s at {concurrency:,}: the peer completed none")
                    continue
                parts.append(
                    f"turns/s at {concurrency:,} {self.ratio(ours.rate, theirs.rate)}"
                    f" (p99 {self.ratio(ours.p99_s, theirs.p99_s)}, "
                    f"memory {self.ratio(ours.peak_kib, theirs.peak_kib)})"
                )
            lines.append(f"- us vs {LABELS[key]}: " + ", ".join(parts))
        return lines

    def targets(self) -> list[str]:
        us, fake = self.results.get("us"), self.fake
        if not us or us.missing or not fake:
            return ["(targets not checked: us or the fake alone was not measured)"]
        assert us.json1
        assert fake.json1
        litellm, portkey = self.results.get("litellm"), self.results.get("portkey")
        checks: list[tuple[str, bool | None, str]] = []

        def peer_check(
            name: str, peer: Results | None, pick: Callable[[Results], float], factor: float
        ) -> None:
            if peer is None or peer.missing:
                checks.append((name, None, "peer not measured"))
                return
            ours, theirs = pick(us), pick(peer)
            if not theirs:
                checks.append((name, None, "the peer served none"))
                return
            checks.append((name, ours >= factor * theirs, f"{ours / theirs:.2f}x"))

        def rate(which: str) -> Callable[[Results], float]:
            def pick(result: Results) -> float:
                measured = getattr(result, which)
                return float(measured.rate) if measured else NAN

            return pick

        peer_check("requests/s ≥ 6x LiteLLM's", litellm, rate("json50"), 6)
        peer_check("streams/s ≥ 8x LiteLLM's", litellm, rate("stream50"), 8)
        peer_check("requests/s ≥ Portkey's", portkey, rate("json50"), 1)
        added50 = us.json1.p50_ms - fake.json1.p50_ms
        added99 = us.json1.p99_ms - fake.json1.p99_ms
        checks.append(("≤ 1 ms added at p50, 1 conn.", added50 <= 1, f"{_added(added50)} ms"))
        checks.append(("≤ 5 ms added at p99, 1 conn.", added99 <= 5, f"{_added(added99)} ms"))
        big = PROMPTS[-1]
        added = us.prompts[big].p50_ms - fake.prompts[big].p50_ms
        checks.append(
            (f"a {big // 1000} KB prompt adds ≤ 1.5 ms at p50", added <= 1.5, f"{_added(added)} ms")
        )
        if 500 in us.fleets and 500 in fake.fleets:
            ours, base = us.fleets[500], fake.fleets[500]
            share = ours.rate / base.rate if base.rate else NAN
            checks.append(
                ("fleet of 500: ≥ 95% of the fake's turns/s", share >= 0.95, f"{share:.0%}")
            )
            p50 = 1000 * (ours.p50_s - base.p50_s)
            p99 = 1000 * (ours.p99_s - base.p99_s)
            checks.append(("fleet of 500: ≤ +20 ms at p50", p50 <= 20, f"{_added(p50)} ms"))
            checks.append(("fleet of 500: ≤ +100 ms at p99", p99 <= 100, f"{_added(p99)} ms"))
            checks.append(("fleet of 500: no errors", ours.errors == 0, f"{ours.errors} errors"))
            # The memory the server takes is its PSS: the sum of RSS counts each
            # shared page once per process (both are printed).
            mb, rss = ours.pss_peak_kib * 1024 / 1e6, ours.peak_kib * 1024 / 1e6
            checks.append(
                (
                    "fleet of 500: ≤ 250 MB for the server (PSS)",
                    mb <= 250,
                    f"{mb:,.0f} MB; RSS summed over its processes {rss:,.0f} MB",
                )
            )
        else:
            checks.append(("fleet of 500", None, "not run (--fleet has no 500)"))
        lines = []
        for name, passed, figure in checks:
            mark = "n/a" if passed is None else ("PASS" if passed else "FAIL")
            lines.append(f"- {mark}: {name} ({figure})")
        return lines


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="brief runs (CI); nothing installed")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--fleet",
        type=lambda text: [int(n) for n in text.split(",") if n],
        default=[200, 500, 1000],
        help="fleet sizes, comma-separated",
    )
    parser.add_argument("--fleet-duration", type=float, default=20.0)
    parser.add_argument("--fleet-drain", type=float, default=30.0)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--servers",
        type=lambda text: [name for name in text.split(",") if name],
        default=list(SERVER_ORDER),
        help=f"which to measure, comma-separated, of {','.join(SERVER_ORDER)}",
    )
    parser.add_argument("--no-wrk", action="store_true", help="use the Python load generator")
    parser.add_argument("--no-litellm", action="store_true", help="leave out LiteLLM")
    parser.add_argument("--no-portkey", action="store_true", help="leave out Portkey")
    parser.add_argument("--profile", action="store_true", help="py-spy one worker of ours")
    parser.add_argument("--profile-duration", type=float, default=10.0)
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args()
    if args.short:
        args.duration, args.warmup, args.connections, args.users = 1.0, 1.0, 10, 10
        args.fleet, args.fleet_duration, args.fleet_drain = [40], 3.0, 10.0
        args.profile_duration = 2.0
    for flag, key in (("no_litellm", "litellm"), ("no_portkey", "portkey")):
        if getattr(args, flag) and key in args.servers:
            args.servers.remove(key)
    unknown = set(args.servers) - set(SERVER_ORDER)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    if args.users * 8 < max(args.fleet, default=0):
        parser.error("--users too few: each user may have 8 requests in flight")

    started = time.monotonic()
    with fresh_database() as database_url:
        bench = Bench(args, database_url)
        try:
            run(bench, started)
        finally:
            bench.stop()


def run(bench: Bench, started: float) -> None:
    args = bench.args
    bench.prepare()
    results: dict[str, Results] = {}
    profile = ""
    for key in [name for name in SERVER_ORDER if name in args.servers]:
        began = time.monotonic()
        fake_port = bench.start_fake()
        fake_process = bench.processes[-1]
        target: Target | str
        if key == "fake":
            target = fake_target(bench, fake_port)
        else:
            try:
                target = STARTERS[key](bench, fake_port)
            except Exception:
                if key == "us":
                    raise
                target = "failed to start (see the logs)"
        print(f"-- {LABELS[key]} ready after {time.monotonic() - began:.1f} s", flush=True)
        if isinstance(target, str):
            print(f"!! {LABELS[key]} left out: {target}")
            results[key] = Results(LABELS[key], missing=target)
        else:
            results[key] = bench.measure(target)
            if key == "us":
                if args.profile:
                    profile = bench.profile(target)
                us = results[key]
                assert us.json50 is not None
                if us.json50.requests <= us.json50.errors:
                    raise SystemExit("!! not one request through us succeeded: the bench is broken")
            if target.process is not fake_process:
                stop_process(target.process)
            print(f"-- {LABELS[key]} done after {time.monotonic() - began:.1f} s", flush=True)
        stop_process(fake_process)
    statements = run_statement_count(bench.env)

    report = Report(results, args)
    print()
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, database "
        f"{'PostgreSQL' if bench.database_url.startswith('postgres') else 'SQLite'}, "
        f"load generator {'wrk' if bench.wrk else 'benchmarks.loadgen'} and benchmarks.fleet, "
        f"{args.duration:g} s per request load, each server against its own fresh fake"
        + (" (SHORT RUN: the figures mean nothing)" if args.short else ""),
        "",
        *report.tables(),
        "",
        *report.details(),
        f"- Database statements per request through us: {statements}",
        "",
        "Ratios:",
        *report.ratios(),
        "",
        "Targets (issue 11):",
        *report.targets(),
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if profile:
        print()
        print(profile)
    print()
    print(f"Benchmark took {time.monotonic() - started:.0f} s (logs in {bench.logs})")


if __name__ == "__main__":
    main()
