"""Locate, or install once, the npm-distributed coding agents the end-to-end tests run.

Each client is installed with npm into ``var/<name>/<version>/`` (``/var/`` is
git-ignored), in a scratch folder renamed into place only once it works, under
a file lock, so concurrent test runs never see a half-installed tree and only
one of them downloads.

All three packages are thin wrappers around a native binary shipped as an
optional dependency per platform (``opencode-linux-x64``,
``@anthropic-ai/claude-code-linux-x64``, ``@openai/codex-linux-x64``).
opencode and Claude Code copy or link it into place from a postinstall script;
should npm not run install scripts (npm's ``allowScripts``), that script is run
here explicitly. Codex's ``bin/codex.js`` finds its binary at run time.

Versions are exact pins: these clients publish often and change what they send
between releases. Bump a pin after checking its end-to-end test still passes.

``python -m tests.support.npm_clients`` installs them all (``make clients``, used by CI
so that the tests find them ready).

In CI (the ``CI`` environment variable set) a client that cannot be installed
fails its test; elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

VAR_ROOT = Path(__file__).resolve().parents[2] / "var"
INSTALL_TIMEOUT = 600.0
VERSION_TIMEOUT = 30.0


class ClientUnavailable(Exception):
    """A client cannot be installed here: no node/npm, or npm could not install it."""


@dataclass(frozen=True, slots=True)
class NpmClient:
    """One pinned npm package and the executable it provides."""

    #: The folder under ``var/`` its versions are installed into.
    name: str
    package: str
    version: str
    #: The executable, relative to the package's folder in ``node_modules``.
    executable: str
    #: The package's own install script, relative to the same folder, run
    #: explicitly when npm skipped it; ``None`` if it has none to run.
    postinstall: str | None = None

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"

    @property
    def cache_root(self) -> Path:
        return VAR_ROOT / self.name

    def binary_in(self, prefix: Path) -> Path:
        return prefix.joinpath("node_modules", *self.package.split("/"), self.executable)

    def binary(self) -> Path:
        """The pinned executable, installed into ``var/<name>/<version>/`` on first use.

        Raises ``ClientUnavailable`` when node or npm is missing or the install
        fails, ``RuntimeError`` when an install succeeded but looks broken.
        """
        final = self.cache_root / self.version
        binary = self.binary_in(final)
        if binary.is_file():
            return binary
        npm, node = shutil.which("npm"), shutil.which("node")
        if npm is None or node is None:
            raise ClientUnavailable(f"node and npm are needed to install {self.spec}")
        self.cache_root.mkdir(parents=True, exist_ok=True)
        with _locked(self.cache_root / ".install.lock"):
            if binary.is_file():  # another run installed it while we waited
                return binary
            # Holding the lock, no other install is running: clear what failed ones left.
            for leftover in self.cache_root.glob(f".{self.version}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            if final.exists():  # a tree damaged by hand: start again
                shutil.rmtree(final)
            scratch = Path(tempfile.mkdtemp(prefix=f".{self.version}-", dir=self.cache_root))
            try:
                with tempfile.TemporaryDirectory(prefix=f"{self.name}-home-") as home:
                    self._install(scratch, npm, node, _quiet_env(Path(home)))
                scratch.chmod(0o755)  # mkdtemp made it private
                os.rename(scratch, final)
            finally:
                if scratch.exists():
                    shutil.rmtree(scratch, ignore_errors=True)
        return binary

    def _install(self, prefix: Path, npm: str, node: str, env: dict[str, str]) -> None:
        """Install the pinned package into the empty folder ``prefix``."""
        command = [
            npm,
            "install",
            "--prefix",
            str(prefix),
            "--no-save",
            "--no-package-lock",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            # Give up on an unreachable registry within seconds, not npm's minute.
            "--fetch-retry-mintimeout=1000",
            "--fetch-retry-maxtimeout=5000",
            self.spec,
        ]
        try:
            result = _run(command, prefix, env, INSTALL_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise ClientUnavailable(
                f"`npm install {self.spec}` took over {INSTALL_TIMEOUT:.0f} s "
                "(is the npm registry reachable?)"
            ) from exc
        if result.returncode != 0:
            raise ClientUnavailable(
                f"`npm install {self.spec}` failed (exit {result.returncode}):\n"
                f"{_head(result.stderr or result.stdout)}"
            )
        binary = self.binary_in(prefix)
        if self.postinstall is not None and self._reported_version(binary, env) is None:
            # npm skipped the install script: put the platform binary in place ourselves.
            script = binary.parent.parent / self.postinstall
            placed = _run([node, str(script)], script.parent, env, INSTALL_TIMEOUT)
            if placed.returncode != 0:
                raise ClientUnavailable(
                    f"{self.spec}'s {self.postinstall} found no platform binary:\n"
                    f"{_head(placed.stderr or placed.stdout)}"
                )
        reported = self._reported_version(binary, env)
        if reported is None or self.version not in reported.split():
            # npm succeeded, so this is no registry problem: fail loudly, never skip.
            raise RuntimeError(f"installed {self.spec}, but `{binary} --version` gave {reported!r}")

    @staticmethod
    def _reported_version(binary: Path, env: dict[str, str]) -> str | None:
        """What ``<binary> --version`` prints, or None if it does not run."""
        try:
            result = _run([str(binary), "--version"], binary.parent, env, VERSION_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if result.returncode != 0:
            return None
        return result.stdout.strip()


OPENCODE = NpmClient(
    name="opencode",
    package="opencode-ai",
    version="1.18.33",
    executable="bin/opencode.exe",
    postinstall="postinstall.mjs",
)
CLAUDE_CODE = NpmClient(
    name="claude-code",
    package="@anthropic-ai/claude-code",
    version="2.1.332",
    executable="bin/claude.exe",
    postinstall="install.cjs",
)
CODEX = NpmClient(
    name="codex",
    package="@openai/codex",
    version="0.171.0",
    executable="bin/codex.js",
)
CLIENTS: tuple[NpmClient, ...] = (OPENCODE, CLAUDE_CODE, CODEX)


#: Longest a client may take for one prompt against the fake.
RUN_TIMEOUT = 120.0


@dataclass(frozen=True)
class ClientRun:
    """One run of a client CLI: its exit status, its output and a report for assertions."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def report(self) -> str:
        return f"exit {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"

    def json_events(self) -> list[dict[str, Any]]:
        """Its standard output read as JSON lines, one object each."""
        events = []
        for line in self.stdout.splitlines():
            if line.strip():
                event = json.loads(line)
                assert isinstance(event, dict), line
                events.append(event)
        return events


def run_client(command: list[str], root: Path, env: dict[str, str]) -> ClientRun:
    """Run a client CLI in a fresh project folder under ``root``, no input, bounded in time."""
    workdir = root / "project"
    workdir.mkdir()
    try:
        result = subprocess.run(
            command,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{Path(command[0]).name} took over {RUN_TIMEOUT:.0f} s; stdout: {exc.stdout!r}"
        )
    return ClientRun(result.returncode, result.stdout, result.stderr)


def in_ci() -> bool:
    """Whether the suite runs in CI, where a missing client is a failure."""
    return bool(os.environ.get("CI"))


def require(client: NpmClient) -> Path:
    """The client's executable for a test: skipped where it is not installable, failed in CI."""
    try:
        return client.binary()
    except ClientUnavailable as exc:
        reason = f"{client.spec} is not installable here: {exc}"
        if in_ci():
            pytest.fail(f"{reason}\n(CI is set: a client the suite needs may not be missing)")
        pytest.skip(reason)


def isolated_env(root: Path) -> dict[str, str]:
    """A fresh HOME, XDG folders and TMPDIR under ``root``; nothing inherited but PATH.

    Nothing a client writes lands in the real home, and no proxy or API key
    variable of the caller's environment reaches it.
    """
    dirs = {
        "HOME": root / "home",
        "XDG_CONFIG_HOME": root / "config",
        "XDG_DATA_HOME": root / "data",
        "XDG_CACHE_HOME": root / "cache",
        "XDG_STATE_HOME": root / "state",
        "TMPDIR": root / "tmp",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        **{name: str(path) for name, path in dirs.items()},
    }


def _quiet_env(scratch: Path) -> dict[str, str]:
    """The environment for npm and ``--version``, with every client's own folders in ``scratch``.

    Even ``--version`` creates folders (opencode under ``~/.config``, ``~/.cache``
    and ``~/.local``, Codex under ``~/.codex``). HOME itself stays, so npm keeps
    the user's cache and registry settings.
    """
    env = dict(os.environ)
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        env[name] = str(scratch / name.lower())
    env["CLAUDE_CONFIG_DIR"] = str(scratch / "claude")
    env["CODEX_HOME"] = str(scratch / "codex")
    (scratch / "codex").mkdir()
    env["OPENCODE_DISABLE_AUTOUPDATE"] = "true"
    env["DISABLE_AUTOUPDATER"] = "1"
    env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] = "1"
    return env


def _run(
    command: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _head(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[:lines])


def main() -> int:
    """Install every client (``make clients``); exit 1 if one cannot be installed."""
    failed = 0
    for client in CLIENTS:
        try:
            print(f"{client.spec}: {client.binary()}")
        except ClientUnavailable as exc:
            print(f"{client.spec}: not installed: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
