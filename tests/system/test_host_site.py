"""The apps as a platform developer gets them: a wheel, a fresh virtualenv, a bare host site.

The wheel is built from a copy of the two apps' sources, installed (not
editable) into a virtualenv of its own under ``var/host-site/``, kept there
keyed by a hash of the sources, and ``examples/host_site/`` (a site made by
``django-admin startproject`` plus the README's lines) runs under uvicorn with
``DEBUG`` off against the fake OpenRouter, served by this test on loopback.
Nothing of the repository is importable in that virtualenv but the wheel.
"""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest

from devtools.fake_openrouter import FakeOpenRouter, run_fake_openrouter
from tests.support.processes import free_port
from tests.support.servers import wait_until

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "host_site"
CACHE = REPO / "var" / "host-site"
APPS = ("openrouter_proxy", "billing")
# What building the wheel reads: the apps and the project's metadata.
WHEEL_SOURCES = ("pyproject.toml", "README.md", *APPS)
# What the host's virtualenv gets beside the wheel (README: "Mount the apps").
HOST_EXTRAS = ("servestatic>=4.1,<5",)
SERVER_KEY = "sk-or-host-site-test-0123456789"
ALICE_TOKEN = "host-site-token-alice-0123456789"
BOB_TOKEN = "host-site-token-bob-0123456789"
ADMIN_PASSWORD = "host-site-admin-password"
MODEL = "x-ai/grok-code-fast-1"


def _ignored(directory: str, names: list[str]) -> list[str]:
    return [name for name in names if name == "__pycache__" or name.endswith((".pyc", ".pyo"))]


def _source_files() -> list[Path]:
    files: list[Path] = []
    for name in WHEEL_SOURCES:
        path = REPO / name
        if path.is_dir():
            files += sorted(
                item
                for item in path.rglob("*")
                if item.is_file() and "__pycache__" not in item.parts and item.suffix != ".pyc"
            )
        else:
            files.append(path)
    return files


def sources_digest() -> str:
    """A hash of everything the wheel is built from, and of what the venv is made with."""
    digest = hashlib.sha256()
    digest.update(sys.version.encode())
    digest.update(repr(HOST_EXTRAS).encode())
    for path in _source_files():
        digest.update(str(path.relative_to(REPO)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result  # type: ignore[no-any-return]


@dataclass(frozen=True)
class HostVenv:
    python: Path
    wheel: Path


def _build(target: Path) -> None:
    """The wheel, from a clean copy of the sources (no stale ``build/``), and its venv."""
    with tempfile.TemporaryDirectory(prefix="host-site-build-") as scratch:
        source = Path(scratch) / "src"
        source.mkdir()
        for name in WHEEL_SOURCES:
            path = REPO / name
            if path.is_dir():
                shutil.copytree(path, source / name, ignore=_ignored)
            else:
                shutil.copy2(path, source / name)
        dist = target / "dist"
        _run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)]
        )
    (wheel,) = dist.glob("*.whl")
    _run([sys.executable, "-m", "venv", str(target / "venv")])
    python = target / "venv" / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", str(wheel), *HOST_EXTRAS])


def _remove_stale_builds(keep_for: float = 3600) -> None:
    """Builds of other versions of the sources, unused for an hour (a run may still use one)."""
    for build in CACHE.iterdir():
        ready = build / "ready"
        marker = ready if ready.exists() else build  # an interrupted build has no marker
        if build.is_dir() and time.time() - marker.stat().st_mtime > keep_for:
            shutil.rmtree(build, ignore_errors=True)


@pytest.fixture(scope="module")
def host_venv() -> HostVenv:
    """The wheel installed in a venv of its own, built once per version of the sources.

    Under a file lock, so that parallel runs build it once; builds of other versions of the
    sources go once they have been unused for an hour.
    """
    digest = sources_digest()
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / digest
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "ready").exists():
            _remove_stale_builds()
            shutil.rmtree(target, ignore_errors=True)  # a build that was interrupted
            target.mkdir()
            _build(target)
            (target / "ready").touch()
        os.utime(target / "ready")  # in use: not stale
    (wheel,) = (target / "dist").glob("*.whl")
    return HostVenv(python=target / "venv" / "bin" / "python", wheel=wheel)


# --- The wheel ------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_wheel_holds_the_two_apps_and_nothing_else(host_venv: HostVenv) -> None:
    names = zipfile.ZipFile(host_venv.wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == set(APPS)
    for required in (
        "billing/templates/admin/billing/users.html",
        "billing/templates/admin/billing/grant_credits.html",
        "billing/templates/admin/billing/site_index.html",
        "billing/migrations/0001_initial.py",
        "billing/templatetags/billing_admin.py",
    ):
        assert required in names
    # Every template and migration of the apps' sources is in it.
    for app in APPS:
        for pattern in ("templates/**/*", "static/**/*", "migrations/*.py"):
            for path in (REPO / app).glob(pattern):
                if path.is_file():
                    assert str(path.relative_to(REPO)) in names
    development = [
        name
        for name in names
        if ".dist-info/" not in name
        and re.search(r"fake_openrouter|/testing/|seed_usage|terragon|benchmark", name)
    ]
    assert development == []


# --- The host site ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    url: str
    python: Path
    root: Path
    env: dict[str, str]

    def manage(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run([str(self.python), "manage.py", *args], cwd=self.root, env=self.env)


@pytest.fixture(scope="module")
def host(host_venv: HostVenv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    fake = FakeOpenRouter(generation_delay=0.2, api_key=SERVER_KEY)
    with run_fake_openrouter(fake) as running:
        root = tmp_path_factory.mktemp("host") / "host_site"
        shutil.copytree(
            EXAMPLE,
            root,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "db.sqlite3", "staticfiles"),
        )
        # Only the venv's own packages: nothing of this repository on the path.
        env = {
            "PATH": f"{host_venv.python.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(root),
            "LANG": "C.UTF-8",
            "OPENROUTER_API_KEY": SERVER_KEY,
            "OPENROUTER_BASE_URL": running.base_url,
            "HOST_SITE_TOKENS": f"{ALICE_TOKEN}=alice, {BOB_TOKEN}=bob",
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD,
        }
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        site = Host(url=url, python=host_venv.python, root=root, env=env)
        site.manage("migrate", "--no-input", "-v", "0")
        site.manage("collectstatic", "--no-input", "-v", "0")
        site.manage("createsuperuser", "--no-input", "--username", "admin", "--email", "a@x.test")
        log = open(root / "uvicorn.log", "w")  # noqa: SIM115  (closed below)
        server = subprocess.Popen(
            [
                str(host_venv.python),
                "-m",
                "uvicorn",
                "host_site.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/admin/login/", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            if not wait_until(ready, timeout=60, interval=0.1):
                log.flush()
                raise AssertionError(
                    f"the host site did not start:\n{(root / 'uvicorn.log').read_text()}"
                )
            yield site
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()
        errors = (root / "uvicorn.log").read_text()
        assert "Traceback" not in errors, errors


@pytest.mark.slow
def test_the_host_runs_only_the_wheel(host: Host) -> None:
    probe = _run(
        [
            str(host.python),
            "-c",
            "import importlib.util as u, billing, openrouter_proxy;"
            "print(billing.__file__); print(openrouter_proxy.__file__);"
            "print(u.find_spec('terragon'), u.find_spec('tests'))",
        ],
        cwd=host.root,
        env=host.env,
    )
    billing_file, proxy_file, missing = probe.stdout.splitlines()
    assert "site-packages" in billing_file
    assert "site-packages" in proxy_file
    assert missing == "None None"
    # The host's checks pass, settings and all, without the demo site's defaults.
    check = host.manage("check", "--fail-level", "WARNING")
    assert "no issues" in check.stdout


def _chat(host: Host, token: str) -> httpx.Response:
    return httpx.post(
        f"{host.url}/api/proxy/openrouter/v1/chat/completions",
        headers={"Authorization": f"Bearer {token}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
        timeout=30,
    )


def _balance(host: Host, token: str) -> Decimal:
    answer = httpx.get(f"{host.url}/api/billing/balance", headers={"X-Daemon-Token": token})
    assert answer.status_code == 200, answer.text
    return Decimal(answer.json()["balance"])


@pytest.mark.slow
def test_a_user_is_refused_then_billed_exactly(host: Host) -> None:
    first = _chat(host, ALICE_TOKEN)
    assert first.status_code == 402, first.text
    host.manage("grant_credits", "alice", "5", "--note", "host-site test")
    assert _balance(host, ALICE_TOKEN) == Decimal(5)
    costs = []
    for _ in range(3):
        answer = _chat(host, ALICE_TOKEN)
        assert answer.status_code == 200, answer.text
        costs.append(Decimal(str(answer.json()["usage"]["cost"])))
    assert all(cost > 0 for cost in costs)
    assert _balance(host, ALICE_TOKEN) == Decimal(5) - sum(costs)
    usage = httpx.get(f"{host.url}/api/billing/usage", headers={"X-Daemon-Token": ALICE_TOKEN})
    assert usage.status_code == 200
    assert sorted(Decimal(row["cost"]) for row in usage.json()["results"]) == sorted(costs)
    # Without the fast path's early refusal, a bad token is still the proxy's 401.
    assert _chat(host, "not-a-token").status_code == 401


@pytest.mark.slow
def test_the_billing_api_refuses_anonymous_callers(host: Host) -> None:
    for path in ("balance", "usage", "ledger", "keys"):
        answer = httpx.get(f"{host.url}/api/billing/{path}")
        assert answer.status_code == 401, (path, answer.text)
        assert answer.json()["error"]["type"] == "authentication_error"
        assert answer.headers["WWW-Authenticate"]


def _stylesheets(page: str) -> list[str]:
    return re.findall(r'<link[^>]+rel="stylesheet"[^>]*href="([^"]+)"', page) + re.findall(
        r'<link[^>]+href="([^"]+\.css)"[^>]*rel="stylesheet"', page
    )


@pytest.mark.slow
def test_every_billing_admin_page_is_there_and_styled(host: Host) -> None:
    # Something to show: bob's first request is refused, then he has credit and spends some.
    assert _chat(host, BOB_TOKEN).status_code == 402
    host.manage("grant_credits", "bob", "2")
    assert _chat(host, BOB_TOKEN).status_code == 200
    with httpx.Client(base_url=host.url, follow_redirects=False, timeout=30) as browser:
        login = browser.get("/admin/login/")
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.text)
        assert csrf is not None
        signed_in = browser.post(
            "/admin/login/?next=/admin/",
            data={
                "csrfmiddlewaretoken": csrf.group(1),
                "username": "admin",
                "password": ADMIN_PASSWORD,
            },
            headers={"Referer": f"{host.url}/admin/login/"},
        )
        assert signed_in.status_code == 302, signed_in.text
        index = browser.get("/admin/")
        assert index.status_code == 200
        # The billing pages the admin links to, plus the grant form and one of each record.
        pages = set(re.findall(r'href="(/admin/billing/[^"?#]*)', index.text))
        users = browser.get("/admin/billing/creditaccount/users/")
        assert users.status_code == 200, users.text
        pages |= set(re.findall(r'href="(/admin/billing/creditaccount/grant/\d+/)', users.text))
        for listing in ("usagerecord", "creditledgerentry"):
            rows = browser.get(f"/admin/billing/{listing}/").text
            pages |= set(re.findall(rf'href="(/admin/billing/{listing}/\d+/change/)', rows)[:1])
        expected = {
            "/admin/billing/",
            "/admin/billing/usagerecord/dashboard/",
            "/admin/billing/creditaccount/users/",
            "/admin/billing/usagerecord/",
            "/admin/billing/creditledgerentry/",
            "/admin/billing/modelprice/",
        }
        assert expected <= pages, pages
        assert any("/grant/" in page for page in pages)
        assert any(
            page.startswith("/admin/billing/usagerecord/") and "change" in page for page in pages
        )
        styles: set[str] = set()
        for page in sorted(pages | {"/admin/"}):
            answer = browser.get(page)
            assert answer.status_code == 200, (page, answer.status_code, answer.text[:2000])
            assert "text/html" in answer.headers["content-type"]
            sheets = _stylesheets(answer.text)
            assert any("admin/css/base.css" in sheet for sheet in sheets), (page, sheets)
            styles |= {urljoin(str(answer.url), sheet) for sheet in sheets}
        for sheet in sorted(styles):
            css = browser.get(sheet)
            assert css.status_code == 200, sheet
            assert css.headers["content-type"].startswith("text/css"), sheet
            assert css.content
        export = browser.get("/admin/billing/usagerecord/export.csv")
        assert export.status_code == 200
        assert export.headers["content-type"].startswith("text/csv")


# --- The README and the example agree ---------------------------------------------------------


def readme_mount_lines() -> dict[str, list[str]]:
    """The lines the README's mounting section tells a host to add, by file."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Mount the apps in another Django site\n", 1)[1].split("\n## ", 1)[0]
    files: dict[str, list[str]] = {}
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL):
        lines = block.splitlines()
        label = re.fullmatch(r"# (\w+\.py)", lines[0])
        assert label is not None, f"a block of the mounting section names no file: {lines[0]!r}"
        files[label.group(1)] = [line for line in lines[1:] if line.strip()]
    return files


def test_the_readme_names_the_files_the_example_changes() -> None:
    assert set(readme_mount_lines()) == {"settings.py", "urls.py", "asgi.py"}


@pytest.mark.parametrize("name", ["settings.py", "urls.py", "asgi.py"])
def test_the_example_is_startproject_plus_the_readme_lines(name: str, tmp_path: Path) -> None:
    import django

    example = [line for line in (EXAMPLE / "host_site" / name).read_text().splitlines()]
    added = readme_mount_lines()[name]
    # The README's lines, in order, at the end of the file.
    assert [line for line in example if line.strip()][-len(added) :] == added
    generated = re.search(
        r"using Django (\d+\.\d+)", (EXAMPLE / "host_site" / "settings.py").read_text()
    )
    assert generated is not None
    if generated.group(1) != ".".join(str(part) for part in django.VERSION[:2]):
        pytest.skip(f"the example was made by Django {generated.group(1)}")
    _run(
        [
            str(Path(sys.executable).parent / "django-admin"),
            "startproject",
            "host_site",
            str(tmp_path),
        ]
    )
    fresh = (tmp_path / "host_site" / name).read_text().splitlines()
    diff = list(difflib.ndiff(fresh, example))
    removed = [line[2:] for line in diff if line.startswith("- ")]
    extra = [line[2:] for line in diff if line.startswith("+ ") and line[2:].strip()]
    # Only startproject's random key and its patch version differ; nothing else is changed.
    replaced = re.compile(
        r"SECRET_KEY = 'django-insecure-|Generated by 'django-admin startproject'"
    )
    assert all(replaced.match(line) for line in removed), removed
    assert [line for line in extra if not replaced.match(line)] == added
