"""The site's ASGI application with a test-only probe, for server processes in tests.

``GET /__probe__`` answers, from inside the worker that took the request, what
the reliability tests cannot see from outside: the worker's pid, its
background settlement tasks, all of its asyncio tasks, its resident memory and
its open file descriptors. Only test helpers serve this module, on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from terragon.asgi import application as site_application

PROBE_PATH = "/__probe__"


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return -1


def snapshot() -> dict[str, Any]:
    from openrouter_proxy.settlement import pending_tasks

    return {
        "pid": os.getpid(),
        "pending_tasks": pending_tasks(),
        # The probe's own request task is one of them.
        "asyncio_tasks": len(asyncio.all_tasks()),
        "rss": _rss(),
        "fds": len(os.listdir("/proc/self/fd")),
    }


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope.get("path") == PROBE_PATH:
        body = json.dumps(snapshot()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return
    await site_application(scope, receive, send)
