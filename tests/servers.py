"""Real servers for tests (see ``openrouter_proxy.testing.servers``)."""

from openrouter_proxy.testing.servers import serve_in_thread, wait_until

__all__ = ["serve_in_thread", "wait_until"]
