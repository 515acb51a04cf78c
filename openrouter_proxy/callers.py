"""Who is calling: the contract between the proxy and a site's key system.

The proxy never looks at API keys itself. It hands the presented token to one
verifier, named by the ``OPENROUTER_PROXY_KEY_VERIFIER`` setting, and gets a
:class:`Caller` back (or ``None`` for a token that is not valid). A verifier
may be a plain function (it runs in a worker thread, so it may use the ORM) or
a coroutine function (awaited directly).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from django.utils.module_loading import import_string

from openrouter_proxy.db import run_db


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: a user of the site and the key they presented."""

    user: Any
    key_id: int | None = None
    # Public, loggable label of the key (never the secret), e.g. its prefix.
    key_label: str = ""

    @property
    def user_id(self) -> int:
        return int(self.user.pk)


class ApiKeyRejected(Exception):
    """Raised by a verifier to refuse a token with a specific, user-facing reason."""


Verifier = Callable[[str], "Caller | Awaitable[Caller | None] | None"]


@functools.cache
def _load_verifier(path: str) -> Callable[[str], Awaitable[Caller | None]]:
    func = import_string(path)
    if inspect.iscoroutinefunction(func):
        return func  # type: ignore[no-any-return]
    return functools.partial(run_db, func)


def get_verifier() -> Callable[[str], Awaitable[Caller | None]]:
    from openrouter_proxy.conf import proxy_settings

    return _load_verifier(proxy_settings.KEY_VERIFIER)


def extract_token(headers: Callable[[str], str | None]) -> str | None:
    """The token of a request: ``X-Daemon-Token``, else ``Authorization: Bearer``.

    ``headers`` looks a header up by lower-case name. Returns ``None`` when the
    request carries no token at all.
    """
    daemon = (headers("x-daemon-token") or "").strip()
    if daemon:
        return daemon
    authorization = (headers("authorization") or "").strip()
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None
