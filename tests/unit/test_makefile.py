"""The Makefile's phony targets all exist."""

from __future__ import annotations

import re
from pathlib import Path

MAKEFILE = Path(__file__).resolve().parents[2] / "Makefile"


def test_every_phony_target_is_defined() -> None:
    text = MAKEFILE.read_text()
    phony = {name for line in re.findall(r"^\.PHONY:(.*)$", text, re.M) for name in line.split()}
    defined = set(re.findall(r"^([A-Za-z][\w-]*):(?!=)", text, re.M))
    assert phony
    assert phony - defined == set()
