"""What a process holds, read from Linux's /proc (psutil is not a dependency).

Every helper raises :class:`ProcUnavailable` where /proc is missing, so
tests can skip with a clear reason on other systems.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")

# /proc/net/tcp state codes.
ESTABLISHED = "01"
LISTEN = "0A"


class ProcUnavailable(RuntimeError):
    pass


def require_proc() -> None:
    if not (PROC / "self" / "status").exists() or not (PROC / "net" / "tcp").exists():
        raise ProcUnavailable("needs Linux /proc to inspect processes and sockets")


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid``."""
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ProcUnavailable(f"no VmRSS for process {pid}")


def parent_of(pid: int) -> int:
    stat = (PROC / str(pid) / "stat").read_text()
    # The command name is in parentheses and may contain spaces.
    return int(stat.rsplit(")", 1)[1].split()[1])


def children_of(pid: int) -> list[int]:
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                if parent_of(int(entry.name)) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return sorted(found)


def _tcp_rows() -> list[tuple[int, int, str, str]]:
    """(local port, remote port, state, inode) of every IPv4/IPv6 TCP socket."""
    rows = []
    for name in ("tcp", "tcp6"):
        path = PROC / "net" / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            rows.append(
                (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state, inode)
            )
    return rows


def connections_to(port: int) -> int:
    """Established TCP connections whose remote end is ``port`` on this host."""
    return sum(1 for _, remote, state, _ in _tcp_rows() if remote == port and state == ESTABLISHED)


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = PROC / str(pid) / "fd"
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def open_fds(pid: int) -> int:
    return sum(1 for _ in (PROC / str(pid) / "fd").iterdir())


def established_sockets(pid: int) -> int:
    """TCP connections (any peer) held open by ``pid``."""
    mine = socket_inodes(pid)
    return sum(1 for _, _, state, inode in _tcp_rows() if state == ESTABLISHED and inode in mine)


def connections_of_to(pid: int, port: int) -> int:
    """Established connections held by ``pid`` whose remote end is ``port``."""
    mine = socket_inodes(pid)
    return sum(
        1
        for _, remote, state, inode in _tcp_rows()
        if state == ESTABLISHED and remote == port and inode in mine
    )


def listening_pids(port: int) -> list[int]:
    """Processes holding the listening socket of ``port``."""
    inodes = {inode for local, _, state, inode in _tcp_rows() if local == port and state == LISTEN}
    holders = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if socket_inodes(int(entry.name)) & inodes:
                holders.append(int(entry.name))
        except OSError:
            continue
    return sorted(holders)


def worker_pids(port: int) -> list[int]:
    """The processes that serve ``port``: without the supervisor of a multi-worker server."""
    holders = listening_pids(port)
    workers = [pid for pid in holders if parent_of(pid) in holders]
    return workers or holders
