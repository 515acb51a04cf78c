"""A verifier module that fails while it is imported (see ``test_checks``)."""

raise RuntimeError("this module's settings are missing")
