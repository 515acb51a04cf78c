"""``manage.py fake_openrouter``: serve the fake OpenRouter as a standalone process.

The demo and the benchmark need an OpenRouter they can hammer without a network
or an account; this serves ``devtools.fake_openrouter`` with
uvicorn and prints the base URL to point the proxy at.
"""

from __future__ import annotations

from typing import Any

import uvicorn
from django.core.management.base import BaseCommand, CommandError, CommandParser

from devtools.fake_openrouter import (
    FAKE_SERVER_OPTIONS,
    FakeOpenRouter,
    base_url_for,
    parse_mode,
)
from devtools.servers import bind_socket, quiet_config


class Command(BaseCommand):
    help = "Serve a fake OpenRouter (every metered endpoint, under /api) on a local port."

    # No database, no migrations, no system checks needed to serve the fake.
    requires_system_checks: list[str] = []
    requires_migrations_checks = False

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="interface to bind")
        parser.add_argument("--port", type=int, default=3999, help="port (0: any free port)")
        parser.add_argument(
            "--generation-delay",
            type=float,
            default=1.0,
            help="seconds during which /v1/generation answers 404 after a generation ends",
        )
        parser.add_argument(
            "--api-key",
            default=None,
            help="accept only 'Authorization: Bearer KEY' (default: any bearer token)",
        )
        parser.add_argument(
            "--bill-cancelled",
            choices=["delivered", "full"],
            default="delivered",
            help="bill a stream the client leaves for the pieces it received, or in full",
        )
        parser.add_argument(
            "--default-mode",
            default="",
            help="X-Fake-Mode directives applied when a request has none",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        host: str = options["host"]
        try:
            parse_mode(options["default_mode"])
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        app = FakeOpenRouter(
            generation_delay=options["generation_delay"],
            api_key=options["api_key"],
            default_mode=options["default_mode"],
            bill_cancelled=options["bill_cancelled"],
        )
        try:
            sock = bind_socket(host, options["port"])
        except OSError as exc:
            raise CommandError(f"cannot listen on {host}:{options['port']}: {exc}") from exc
        port = int(sock.getsockname()[1])
        config = quiet_config(app, host, port, **FAKE_SERVER_OPTIONS)
        self.stdout.write(base_url_for(host, port))
        self.stdout.flush()
        uvicorn.Server(config).run(sockets=[sock])
