"""Locate, or install once, the opencode CLI (npm ``opencode-ai``) for the tests.

The CLI is installed with npm into ``var/opencode/<version>/`` (``/var/`` is
git-ignored), in a scratch folder renamed into place only once it works, under
a file lock, so concurrent test runs never see a half-installed tree and only
one of them downloads.

``opencode-ai`` is a tiny wrapper whose postinstall script links the right
platform binary (an optional dependency such as ``opencode-linux-x64``) to
``bin/opencode.exe``. Should npm not run that script (npm's ``allowScripts``),
it is run here explicitly.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# An exact pin: opencode publishes several patch releases a day and changes
# what it sends between them. Bump it after checking the end-to-end test passes.
OPENCODE_VERSION = "1.18.33"
OPENCODE_PACKAGE = f"opencode-ai@{OPENCODE_VERSION}"
CACHE_ROOT = Path(__file__).resolve().parent.parent / "var" / "opencode"
INSTALL_TIMEOUT = 600.0
VERSION_TIMEOUT = 30.0


class OpencodeUnavailable(Exception):
    """opencode cannot be installed here: no node/npm, or npm could not install it."""


def _binary_in(prefix: Path) -> Path:
    return prefix / "node_modules" / "opencode-ai" / "bin" / "opencode.exe"


def _quiet_env(scratch: Path) -> dict[str, str]:
    """The environment with opencode's XDG folders moved into ``scratch``.

    Even ``opencode --version`` (which the postinstall script runs too) creates
    folders under ``~/.config``, ``~/.cache`` and ``~/.local``. HOME itself stays,
    so npm keeps the user's cache and registry settings.
    """
    env = dict(os.environ)
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        env[name] = str(scratch / name.lower())
    env["OPENCODE_DISABLE_AUTOUPDATE"] = "true"
    return env


def _reported_version(binary: Path, env: dict[str, str]) -> str | None:
    """What ``opencode --version`` prints, or None if it does not run."""
    try:
        result = subprocess.run(
            [str(binary), "--version"],
            env=env,
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip()


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


def _install(prefix: Path, npm: str, node: str, env: dict[str, str]) -> None:
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
        OPENCODE_PACKAGE,
    ]
    try:
        result = subprocess.run(
            command,
            cwd=prefix,
            env=env,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise OpencodeUnavailable(
            f"`npm install {OPENCODE_PACKAGE}` took over {INSTALL_TIMEOUT:.0f} s "
            "(is the npm registry reachable?)"
        ) from exc
    if result.returncode != 0:
        raise OpencodeUnavailable(
            f"`npm install {OPENCODE_PACKAGE}` failed (exit {result.returncode}):\n"
            f"{_head(result.stderr or result.stdout)}"
        )
    binary = _binary_in(prefix)
    if _reported_version(binary, env) is None:
        # npm skipped the install script: link the platform binary ourselves.
        script = binary.parent.parent / "postinstall.mjs"
        linked = subprocess.run(
            [node, str(script)],
            cwd=script.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
        if linked.returncode != 0:
            raise OpencodeUnavailable(
                f"{OPENCODE_PACKAGE}'s postinstall found no platform binary:\n"
                f"{_head(linked.stderr or linked.stdout)}"
            )
    reported = _reported_version(binary, env)
    if reported != OPENCODE_VERSION:
        # npm succeeded, so this is no registry problem: fail loudly, never skip.
        raise RuntimeError(
            f"installed {OPENCODE_PACKAGE}, but `{binary} --version` gave {reported!r}"
        )


def opencode_binary() -> Path:
    """The pinned opencode binary, installed into ``var/opencode/`` on first use.

    Raises ``OpencodeUnavailable`` when node or npm is missing or the install
    fails (callers skip), ``RuntimeError`` when an install looks broken.
    """
    final = CACHE_ROOT / OPENCODE_VERSION
    binary = _binary_in(final)
    if binary.is_file():
        return binary
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        raise OpencodeUnavailable("node and npm are needed to install opencode-ai")
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE_ROOT / ".install.lock"):
        if binary.is_file():  # another run installed it while we waited
            return binary
        # Holding the lock, no other install is running: clear what failed ones left.
        for leftover in CACHE_ROOT.glob(f".{OPENCODE_VERSION}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if final.exists():  # a tree damaged by hand: start again
            shutil.rmtree(final)
        scratch = Path(tempfile.mkdtemp(prefix=f".{OPENCODE_VERSION}-", dir=CACHE_ROOT))
        try:
            with tempfile.TemporaryDirectory(prefix="opencode-xdg-") as xdg:
                _install(scratch, npm, node, _quiet_env(Path(xdg)))
            scratch.chmod(0o755)  # mkdtemp made it private
            os.rename(scratch, final)
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)
    return binary
