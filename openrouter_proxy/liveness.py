"""This worker's heartbeat, and the recovery of requests whose worker died.

A meter may keep a trace of every admitted request so that a worker killed
mid-stream does not take its charges with it; it can only take a trace over
when the trace's worker has stopped beating. So each serving event loop beats:
one task per loop, started with the loop's first metered request, that calls
the meter's ``beat`` every ``heartbeat_interval`` seconds. The beat answers
with the requests of dead workers it recovered that now wait for their cost;
they are settled from generation stats here, like a disconnect's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from django.db import DatabaseError

from openrouter_proxy.db import run_db
from openrouter_proxy.metering import Meter, get_meter
from openrouter_proxy.settlement import run_in_background, settle_from_generation

logger = logging.getLogger(__name__)

_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] = {}


def ensure_heartbeat(meter: Meter) -> None:
    """Start this loop's heartbeat if it is not running (cheap: a dict lookup)."""
    if meter.heartbeat_interval is None:
        return
    loop = asyncio.get_running_loop()
    task = _tasks.get(loop)
    if task is None or task.done():
        _tasks[loop] = loop.create_task(_heartbeat(meter), name="worker-heartbeat")


async def _heartbeat(meter: Meter) -> None:
    while True:
        try:
            for pending in await _beat(meter):
                if pending.generation_id:
                    run_in_background(
                        settle_from_generation(meter, pending.request_id, pending.generation_id)
                    )
        except asyncio.CancelledError:
            raise
        except DatabaseError as error:
            # A database outage (or a busy SQLite file) must not end the heartbeat:
            # it beats again at the next interval.
            logger.warning("worker heartbeat failed (%s); retrying", error)
        except Exception:
            logger.exception("worker heartbeat failed; retrying")
        await asyncio.sleep(meter.heartbeat_interval or 1.0)


async def _beat(meter: Meter) -> list[Any]:
    """One beat; cancelled, it still waits for its database thread to finish.

    A beat cut short in the loop would go on in its thread, and could write
    the worker's row again after :func:`stop_heartbeat` has retired it.
    """
    beating = asyncio.ensure_future(run_db(meter.beat))
    try:
        return await asyncio.shield(beating)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await beating
        raise


async def stop_heartbeat() -> None:
    """Stop this loop's heartbeat and forget the worker (a clean stop, not a crash)."""
    task = _tasks.pop(asyncio.get_running_loop(), None)
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    meter = get_meter()
    if meter is None:
        return
    try:
        await run_db(meter.retire)
    except Exception:
        logger.warning("could not retire the worker's heartbeat", exc_info=True)
