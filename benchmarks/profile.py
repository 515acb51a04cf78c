"""Where a worker's time goes: py-spy's raw samples, summarised as text.

``py-spy record --format raw`` writes one line per distinct stack,
``frame;frame;...;frame count``, each frame ``function (file:line)``. This
module folds those lines into three short tables: the share of samples by
package of the innermost frame (our code, Django, the HTTP client, psycopg,
uvicorn, asyncio...), the functions that were running themselves ("self"),
and the functions of this project's own code by inclusive share (on the stack
at all). The recording is of samples that held the GIL (``--gil``): the CPU a
worker spends in Python and in the C code Python calls, which is what bounds
one worker's throughput. ``python -m benchmarks.profile FILE`` prints them for a saved file.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

#: Package of a frame, by the first pattern its file matches; order matters.
#: py-spy names files relative to their ``sys.path`` entry.
AREAS = (
    ("this project", r"^(openrouter_proxy|billing|terragon)/"),
    ("Django", r"^django/"),
    ("HTTP client (aiohttp, httpx, httpcore, h11)", r"^(httpx|httpcore|aiohttp|h11|anyio)/"),
    ("psycopg and its pool", r"^psycopg(_pool|_binary)?/"),
    ("uvicorn", r"^uvicorn/"),
    ("asyncio (Python part)", r"^asyncio/"),
    ("thread pool (concurrent.futures, threading)", r"^(threading\.py|concurrent/)"),
    ("json", r"^json/"),
    ("logging", r"^logging/"),
    ("asgiref", r"^asgiref/"),
    ("prometheus_client", r"^prometheus_client/"),
)
#: Innermost frames whose time is spent in C below them, named for what runs there.
NATIVE = {
    "Runner.run": "event loop itself (uvloop's C code: polling, sockets, callbacks)",
}
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def _split(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    if match is None:
        return frame, ""
    return match["name"], match["file"]


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _area(path: str, name: str = "") -> str:
    if name in NATIVE:
        return NATIVE[name]
    for label, pattern in AREAS:
        if re.search(pattern, path):
            return label
    return "other" if path else "native or unknown"


def summarise(raw: str, top: int = 12, possible: int = 0) -> str:
    """The tables; ``possible`` is rate x duration, to say how busy the process was."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in raw.splitlines():
        stack, _, samples = line.rpartition(" ")
        if stack and samples.isdigit():
            stacks[tuple(stack.split(";"))] += int(samples)
    total = sum(stacks.values())
    if not total:
        return "(no samples)"
    by_area: Counter[str] = Counter()
    by_self: Counter[str] = Counter()
    by_ours: Counter[str] = Counter()
    for frames, count in stacks.items():
        name, path = _split(frames[-1])
        by_area[_area(path, name)] += count
        by_self[f"{name} ({_short(path)})"] += count
        seen = set()
        for frame in frames:
            name, path = _split(frame)
            if _area(path).startswith("this project"):
                key = f"{name} ({_short(path)})"
                if key not in seen:
                    seen.add(key)
                    by_ours[key] += count

    def table(title: str, counts: Counter[str]) -> list[str]:
        lines = [f"{title}:"]
        for key, count in counts.most_common(top):
            lines.append(f"  {100 * count / total:5.1f}%  {key}")
        return lines

    busy = f", the GIL held {100 * total / possible:.0f}% of the time" if possible else ""
    lines = [f"{total} samples holding the GIL{busy}"]
    lines += table("By package (innermost frame)", by_area)
    lines += table("Self time, by function", by_self)
    lines += table("This project's functions, inclusive", by_ours)
    return "\n".join(lines)


def main() -> None:
    for name in sys.argv[1:]:
        print(f"== {name}")
        print(summarise(Path(name).read_text()))


if __name__ == "__main__":
    main()
