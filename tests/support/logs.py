"""Checking that nothing went wrong quietly: no ERROR logged, even by a server thread."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def no_errors_logged(*names: str) -> Iterator[None]:
    """Fail if anything inside logs at ERROR or above (a caught exception, say).

    Watches the root logger and the named ones (uvicorn's loggers, say, which
    do not propagate to the root). A handler of its own rather than
    ``caplog``: property tests run many examples in one test, which a
    function-scoped fixture cannot follow.
    """
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(logging.ERROR)
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in names)]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert [record.getMessage() for record in records] == []
