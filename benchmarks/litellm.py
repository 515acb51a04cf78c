"""LiteLLM's proxy in the same benchmark run, as the yardstick users would otherwise pick.

A figure for our gateway means little alone: the question a reader asks is
"faster or slower than what I would install instead?", and the usual answer
to "an OpenAI-compatible gateway in Python" is LiteLLM's proxy. Quoting its
published numbers would compare different machines and different upstreams,
so this module runs it here, on this machine, against the same fake
OpenRouter, for ``benchmarks.run`` to load like any other server.

It installs a pinned release into its own virtualenv under
``var/bench-litellm/`` (once: a marker file records the installed version,
and a file lock keeps two runs from installing at the same time), writes a
config that forwards one model to the fake, and starts the proxy with as
many workers as ours (two in ``make bench``), no database, no master key (so
no ``Authorization`` header is needed; this release refuses to start keyless
unless its config says
``dangerously_permit_weak_or_unset_master_key: true``, which ours does), quiet
logs, and everything that would reach the internet switched off. Its
documented ``forward_client_headers_to_llm_api`` setting is on, so the
``X-Fake-Mode`` header of the benchmark's streamed turns reaches the fake, as
it does through every other server measured.

Nothing here raises when LiteLLM cannot be had: the benchmark goes on without
that row, and one printed line says why.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "var" / "bench-litellm"
VENV = HOME / "venv"
MARKER = HOME / "installed-version"
LOCK = HOME / "install.lock"

#: The release measured in REFERENCE.md section 5; it installs on Python 3.11.
VERSION = "1.108.7"
MODEL = "x-ai/grok-code-fast-1"
INSTALL_TIMEOUT = 900.0
START_TIMEOUT = 120.0

#: Keeps the proxy off the internet and quiet. Each name was read in the
#: installed package's source: the model cost map, the Anthropic beta-header
#: list, the blog feed, policy templates and autorouter presets are fetched
#: from GitHub unless their ``LITELLM_LOCAL_*`` switch is on; telemetry has its
#: own veto; ``LITELLM_MODE=PRODUCTION`` stops it loading a ``.env`` file.
OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_TELEMETRY_DISABLED": "True",
    "LITELLM_MODE": "PRODUCTION",
    "LITELLM_LOG": "ERROR",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    "PYTHONUNBUFFERED": "1",
}

#: Variables that would point LiteLLM at a database or at our project's venv.
DROPPED_ENV_PREFIXES = ("DATABASE_", "DIRECT_URL", "PRISMA_", "LITELLM_MASTER_KEY")
DROPPED_ENV = {"DATABASE_URL", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}


def litellm_url(port: int) -> str:
    """The URL to POST chat completions to; no ``Authorization`` header is needed."""
    return f"http://127.0.0.1:{port}/v1/chat/completions"


@contextmanager
def _locked() -> Iterator[None]:
    HOME.mkdir(parents=True, exist_ok=True)
    with LOCK.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _installed() -> bool:
    with suppress(OSError):
        return MARKER.read_text().strip() == VERSION and (VENV / "bin" / "litellm").exists()
    return False


def _install(logs_dir: Path) -> str | None:
    """Install the pinned release unless it is there; the reason it failed, or None."""
    with _locked():
        if _installed():
            return None
        started = time.monotonic()
        print(f"-- installing litellm[proxy]=={VERSION} into {VENV} (once; cached)")
        with suppress(OSError):
            MARKER.unlink()
        shutil.rmtree(VENV, ignore_errors=True)
        log_path = logs_dir / "litellm-install.log"
        steps = [
            ("creating the virtualenv", [sys.executable, "-m", "venv", str(VENV)]),
            (
                "pip install",
                [
                    str(VENV / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    f"litellm[proxy]=={VERSION}",
                ],
            ),
        ]
        deadline = started + INSTALL_TIMEOUT
        with log_path.open("ab") as log:
            for label, step in steps:
                try:
                    done = subprocess.run(
                        step,
                        stdout=log,
                        stderr=log,
                        check=False,
                        timeout=max(1.0, deadline - time.monotonic()),
                    )
                except (OSError, subprocess.TimeoutExpired) as error:
                    return f"{label} failed: {error}"
                if done.returncode != 0:
                    return f"{label} exited {done.returncode} (see {log_path})"
        MARKER.write_text(VERSION + "\n")
        print(f"-- litellm {VERSION} installed in {time.monotonic() - started:.0f} s")
        return None


def _write_config(fake_base_url: str, logs_dir: Path, server_key: str) -> Path:
    """A YAML config; every scalar is written as a JSON string, which YAML reads as is."""
    config = logs_dir / "litellm-config.yaml"
    lines = [
        "model_list:",
        f"  - model_name: {json.dumps(MODEL)}",
        "    litellm_params:",
        f"      model: {json.dumps('openai/' + MODEL)}",
        f"      api_base: {json.dumps(fake_base_url.rstrip('/') + '/v1')}",
        f"      api_key: {json.dumps(server_key)}",
        "litellm_settings:",
        "  set_verbose: false",
        "  suppress_debug_info: true",
        "  json_logs: false",
        "general_settings:",
        # Since 1.10x it refuses to start without a master key unless told
        # that this is deliberate: the benchmark wants no auth at all.
        "  dangerously_permit_weak_or_unset_master_key: true",
        # ``x-`` headers (the fake's X-Fake-Mode) go to the upstream.
        "  forward_client_headers_to_llm_api: true",
    ]
    config.write_text("\n".join(lines) + "\n")
    return config


def _environment() -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in DROPPED_ENV and not name.startswith(DROPPED_ENV_PREFIXES)
    }
    env.update(OFFLINE_ENV)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _answers(port: int) -> bool:
    """One real completion through the proxy to the fake: the proof it is ready."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi there"}]})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(
            "POST",
            urlsplit(litellm_url(port)).path,
            body=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        payload = json.loads(response.read())
        if response.status != 200:
            return False
    except (OSError, ValueError, http.client.HTTPException):
        return False
    finally:
        connection.close()
    return isinstance(payload, dict) and bool(payload.get("choices"))


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def installed() -> bool:
    """Whether the pinned release is installed already (no network needed to start it)."""
    return _installed()


def start_litellm(
    fake_base_url: str, port: int, logs_dir: Path, server_key: str, workers: int = 1
) -> subprocess.Popen[bytes] | None:
    """Install (once, cached) and start LiteLLM's proxy on 127.0.0.1:``port``.

    It forwards ``x-ai/grok-code-fast-1`` to the fake at ``fake_base_url``
    (``.../api``) as an OpenAI-compatible upstream with ``server_key`` as its
    bearer key; ``workers`` worker processes, no database, no master key, so
    requests need no ``Authorization`` header (``x-`` headers such as
    ``X-Fake-Mode`` are forwarded to the fake). Returns the process once a
    test completion has gone through, or None, after printing one line saying
    why, if it cannot be installed or started. The caller stops it with SIGINT
    like the other servers.
    """
    logs_dir.mkdir(parents=True, exist_ok=True)
    try:
        failure = _install(logs_dir)
    except OSError as error:
        failure = f"installing failed: {error}"
    if failure is not None:
        print(f"!! LiteLLM left out: {failure}")
        return None

    log_path = logs_dir / "litellm.log"
    try:
        config = _write_config(fake_base_url, logs_dir, server_key)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    str(VENV / "bin" / "litellm"),
                    "--config",
                    str(config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--num_workers",
                    str(workers),
                ],
                cwd=logs_dir,
                env=_environment(),
                stdout=log,
                stderr=log,
            )
    except OSError as error:
        print(f"!! LiteLLM left out: could not start it: {error}")
        return None

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            print(f"!! LiteLLM left out: it exited with {process.returncode} (see {log_path})")
            return None
        if _answers(port) and process.poll() is None:
            return process
        time.sleep(0.25)
    _stop(process)
    print(f"!! LiteLLM left out: no completion within {START_TIMEOUT:.0f} s (see {log_path})")
    return None
