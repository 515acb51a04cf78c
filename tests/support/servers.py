"""Real servers for tests (see ``devtools.servers``)."""

from devtools.servers import serve_in_thread, wait_until

__all__ = ["serve_in_thread", "wait_until"]
