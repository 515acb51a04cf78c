"""This repository's development tools, outside the wheel: the fake OpenRouter, servers in a thread.

Used by the tests, the benchmark and ``make run`` (``manage.py fake_openrouter``).
"""
