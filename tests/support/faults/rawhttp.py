"""A deliberately dumb HTTP/1.1 client on a raw socket.

httpx normalises what it sends (paths, header values, framing); hostile-input
tests need to put exact bytes on the wire and see exactly what came back.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass, field


@dataclass
class RawResponse:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    raw: bytes = b""

    def header(self, name: str) -> bytes | None:
        wanted = name.lower().encode()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


def parse_response(raw: bytes) -> RawResponse:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    reason = parts[2] if len(parts) > 2 else b""
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip(), value.strip()))
    response = RawResponse(status=status, reason=reason, headers=headers, raw=raw)
    chunked = (response.header("transfer-encoding") or b"").lower() == b"chunked"
    response.body = _dechunk(body) if chunked else body
    return response


def send_raw(port: int, request: bytes, timeout: float = 10.0) -> RawResponse:
    """Send ``request`` verbatim to 127.0.0.1:``port``; read until the peer closes.

    The request should carry ``Connection: close`` so the server ends the
    exchange. A connection reset or an empty answer yields status 0.
    """
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        # The server may refuse before reading everything.
        with contextlib.suppress(OSError):
            sock.sendall(request)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except (ConnectionResetError, TimeoutError):
            pass
    raw = b"".join(chunks)
    if not raw:
        return RawResponse(status=0, reason=b"no answer")
    return parse_response(raw)


def build_request(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
    host: bytes = b"127.0.0.1",
) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + host]
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"Connection: close")
    if body or method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
