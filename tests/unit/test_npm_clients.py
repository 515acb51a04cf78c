"""The npm installer of the end-to-end clients: skipped without Node, failed in CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import npm_clients
from tests.support.npm_clients import CLIENTS, NpmClient, require

MISSING = NpmClient(name="missing", package="@example/missing", version="1.0.0", executable="x")


@pytest.fixture
def no_node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing installed under ``var/`` and neither node nor npm on PATH."""
    monkeypatch.setattr(npm_clients, "VAR_ROOT", tmp_path / "var")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))


@pytest.mark.usefixtures("no_node")
def test_a_missing_client_is_skipped_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="node and npm are needed"):
        require(MISSING)


@pytest.mark.usefixtures("no_node")
def test_a_missing_client_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require(MISSING)


def test_an_installed_client_is_found_without_npm(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(npm_clients, "VAR_ROOT", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    binary = MISSING.binary_in(tmp_path / "missing" / "1.0.0")
    binary.parent.mkdir(parents=True)
    binary.touch()
    assert require(MISSING) == binary


def test_every_client_is_pinned_to_an_exact_version() -> None:
    for client in CLIENTS:
        assert all(part.isdigit() for part in client.version.split(".")), client.spec
        assert client.binary_in(Path("/p")).is_relative_to(Path("/p/node_modules"))
