"""What the tests share: accounts, requests, servers and processes, waiting, fault injection.

Nothing here is collected as a test; ``tests/conftest.py`` has pytest rewrite the asserts of
these modules as it does a test's.
"""
