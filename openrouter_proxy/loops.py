"""State kept once per event loop: an upstream client, admission connections, answer notes.

A worker may run more than one event loop over its life (the test client and
``async_to_sync`` start their own), and what belongs to one loop (sockets,
futures, tasks) must not be used from another. A :class:`PerLoop` makes its
value for the running loop the first time it is asked there, and lets go of
it when the loop is gone.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    """One value per running event loop, made by ``make`` when first asked for.

    ``usable`` says whether a value made before may still serve (a closed
    client may not); one that may not is made again.
    """

    def __init__(self, make: Callable[[], T], usable: Callable[[T], bool] | None = None) -> None:
        self._make = make
        self._usable = usable
        self._values: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        # The loop last asked for and its value: a worker serves from one loop,
        # and looking it up in the weak dictionary costs a weak reference a call.
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], T] | None = None

    def get(self) -> T:
        """The running loop's value."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            found: T | None = last[1]
        else:
            found = self._values.get(loop)
        if found is None or (self._usable is not None and not self._usable(found)):
            found = self._values[loop] = self._make()
        if last is None or last[1] is not found:
            self._last = (weakref.ref(loop), found)
        return found

    def pop(self) -> T | None:
        """The running loop's value, forgotten (to close it); None if it has none."""
        self._last = None
        return self._values.pop(asyncio.get_running_loop(), None)
