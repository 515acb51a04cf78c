"""``manage.py serve``: what ``make run`` runs.

Migrates, makes sure a demo user with credit exists, reuses the daemon token of
the last start (``var/demo-token``) or issues one, prints it with an opencode
configuration, and serves the site under uvicorn.
Without ``OPENROUTER_API_KEY`` it starts the fake OpenRouter on loopback and
points the proxy at it, so everything works offline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from billing.money import format_usd
from billing.services import balance_of, grant_credits
from openrouter_proxy.callers import ApiKeyRejected
from terragon.apikeys.models import ApiKey
from terragon.apikeys.verifier import verify_api_key

DEMO_USERNAME = "demo"
DEMO_CREDIT = Decimal(10)
# Under VAR_DIR: the demo token, reused between starts while it works.
DEMO_TOKEN_FILE = "demo-token"  # noqa: S105  (a file name)
OPENCODE_MODELS = {
    "grok-code": {"id": "x-ai/grok-code-fast-1", "name": "Grok Code Fast 1"},
    "qwen3-coder": {"id": "qwen/qwen3-coder:exacto", "name": "Qwen3 Coder 480B"},
    "kimi-k2": {"id": "moonshotai/kimi-k2-0905:exacto", "name": "Kimi K2"},
    "glm-4.6": {"id": "z-ai/glm-4.6:exacto", "name": "GLM 4.6"},
}


def opencode_config(base_url: str) -> dict[str, Any]:
    return {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "terry": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Terragon",
                "options": {
                    "baseURL": base_url,
                    "headers": {"X-Daemon-Token": "{env:TERRAGON_TOKEN}"},
                },
                "models": OPENCODE_MODELS,
            }
        },
    }


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            probe.settimeout(0.2)
            if probe.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.05)
    return False


class Command(BaseCommand):
    help = "Set up a demo user and token, then serve the site with uvicorn (make run)."
    # Checked below, once the upstream (real or fake) is known.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=3000)
        parser.add_argument("--workers", type=int, default=1)
        parser.add_argument("--fake-port", type=int, default=3999)

    def handle(self, *args: Any, **options: Any) -> None:
        env = dict(os.environ)
        # Metrics of earlier runs must not add up with this one's.
        metrics_dir = env.get("PROMETHEUS_MULTIPROC_DIR")
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            os.makedirs(metrics_dir, exist_ok=True)
        children: list[subprocess.Popen[bytes]] = []
        if not env.get("OPENROUTER_API_KEY"):
            fake_port = options["fake_port"]
            children.append(
                subprocess.Popen(  # noqa: S603  (our own interpreter and module)
                    [
                        sys.executable,
                        "manage.py",
                        "fake_openrouter",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(fake_port),
                    ]
                )
            )
            if not wait_for_port("127.0.0.1", fake_port, 15):
                self.stderr.write("The fake OpenRouter did not start.")
                children[0].terminate()
                sys.exit(1)
            env["OPENROUTER_API_KEY"] = "sk-or-fake-offline"
            env["OPENROUTER_BASE_URL"] = f"http://127.0.0.1:{fake_port}/api"
            settings.OPENROUTER_PROXY_API_KEY = env["OPENROUTER_API_KEY"]
            settings.OPENROUTER_PROXY_BASE_URL = env["OPENROUTER_BASE_URL"]
            banner = "!" * 78
            self.stdout.write(
                self.style.WARNING(
                    f"\n{banner}\n  NO OPENROUTER_API_KEY SET: serving against the FAKE "
                    f"OpenRouter at {env['OPENROUTER_BASE_URL']}\n  Answers are canned. Set "
                    f"OPENROUTER_API_KEY to use the real one.\n{banner}\n"
                )
            )
        call_command("check")
        call_command("migrate", interactive=False, verbosity=0)
        token = self.prepare_demo_user()
        public = f"http://localhost:{options['port']}"
        self.stdout.write(f"\nDaemon token for user {DEMO_USERNAME!r}:\n\n  {token}\n")
        self.stdout.write("opencode: put this in ~/.config/opencode/opencode.json\n")
        config = opencode_config(f"{public}/api/proxy/openrouter/v1")
        self.stdout.write(json.dumps(config, indent=2))
        self.stdout.write(
            f"\nthen: TERRAGON_TOKEN={token} opencode run --model terry/grok-code "
            '--format json "Hi, how are you?"\n'
        )
        self.stdout.write(
            f"Admin: {public}/admin/ (user {DEMO_USERNAME}, password {DEMO_USERNAME})\n"
        )
        self.stdout.flush()
        server = subprocess.Popen(  # noqa: S603  (our own interpreter and module)
            [
                sys.executable,
                "-m",
                "uvicorn",
                "terragon.asgi:application",
                "--host",
                options["host"],
                "--port",
                str(options["port"]),
                "--workers",
                str(options["workers"]),
            ],
            env=env,
        )
        children.append(server)
        # Stopped by a signal, stop the children too.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            server.wait()
        except KeyboardInterrupt:
            pass
        finally:
            for child in reversed(children):
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)
                    try:
                        child.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        child.kill()

    def prepare_demo_user(self) -> str:
        user_model = get_user_model()
        user, created = user_model.objects.get_or_create(
            username=DEMO_USERNAME, defaults={"is_staff": True, "is_superuser": True}
        )
        if created:
            user.set_password(DEMO_USERNAME)
            user.save()
        if balance_of(user) < 1:
            grant_credits(user, DEMO_CREDIT - balance_of(user), note="demo credit for make run")
        self.stdout.write(f"Demo user {DEMO_USERNAME!r} has ${format_usd(balance_of(user))}.")
        return self.demo_token(user)

    def demo_token(self, user: Any) -> str:
        """The token of the last start while it still works, else a new one (kept for the next)."""
        path = Path(settings.VAR_DIR) / DEMO_TOKEN_FILE
        try:
            kept = path.read_text().strip()
        except FileNotFoundError:
            kept = ""
        if kept:
            try:
                caller = verify_api_key(kept)
            except ApiKeyRejected:
                caller = None
            if caller is not None and caller.user.pk == user.pk:
                self.stdout.write(
                    f"Reusing the demo token kept in {path} (delete the file for a new one)."
                )
                return kept
        _, token = ApiKey.objects.issue(user, name="make-run", expires_in=timedelta(days=30))
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(token)
        self.stdout.write(f"Issued a new demo token (valid 30 days), kept in {path} for next time.")
        return token
