"""This worker's heartbeat, and the recovery of requests whose worker died.

Every admitted request leaves a trace in the database (``billing.recovery``)
so that a worker killed mid-stream does not take its charges with it. A trace
is only taken over when its worker has stopped beating, so each serving worker
beats: one task per event loop, started with the loop's first admission, that
refreshes the heartbeat every ``BILLING_WORKER_HEARTBEAT`` seconds and, in the
same breath, recovers the traces of workers that have stopped (their pending
records are then settled from generation stats here, like a disconnect's), so
a crashed worker's users get their in-flight slots back within about
``BILLING_WORKER_STALE_AFTER`` seconds without waiting for ``reconcile_usage``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from django.db import DatabaseError

from billing.conf import billing_settings
from billing.recovery import beat, pending_after_recovery, recover_lost_requests, retire
from openrouter_proxy.db import run_db
from openrouter_proxy.settlement import run_in_background, settle_from_generation

logger = logging.getLogger(__name__)

_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] = {}


def ensure_heartbeat() -> None:
    """Start this loop's heartbeat if it is not running (cheap: a dict lookup)."""
    loop = asyncio.get_running_loop()
    task = _tasks.get(loop)
    if task is None or task.done():
        _tasks[loop] = loop.create_task(_heartbeat(), name="worker-heartbeat")


async def _heartbeat() -> None:
    while True:
        try:
            await run_db(beat)
            recovered = await run_db(recover_lost_requests)
            for request_id, generation_id in pending_after_recovery(recovered):
                run_in_background(settle_from_generation(request_id, generation_id))
        except asyncio.CancelledError:
            raise
        except DatabaseError as error:
            # A database outage (or a busy SQLite file) must not end the heartbeat:
            # it beats again at the next interval.
            logger.warning("worker heartbeat failed (%s); retrying", error)
        except Exception:
            logger.exception("worker heartbeat failed; retrying")
        await asyncio.sleep(billing_settings.WORKER_HEARTBEAT)


async def stop_heartbeat() -> None:
    """Stop this loop's heartbeat and forget the worker (a clean stop, not a crash)."""
    task = _tasks.pop(asyncio.get_running_loop(), None)
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    try:
        await run_db(retire)
    except Exception:
        logger.warning("could not retire the worker's heartbeat", exc_info=True)
