"""Raw-socket clients for the connection and shutdown tests: ones that stall, never read, or read until the server
closes; and EndlessStream, an app whose response outgrows any socket buffer.

Reads are bounded by BOUND seconds (socket.timeout): only a server that never closes the connection reaches it.
"""

from __future__ import annotations

import asyncio
import socket
import threading

BOUND = 60.0  # a hang guard, far above any timeout under test


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=BOUND)


def read_until_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    parts = []
    while chunk := sock.recv(65536):
        parts.append(chunk)
    return b"".join(parts)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def non_reading_client(url: str, request: bytes) -> socket.socket:
    """A client with a small, fixed receive window that sends `request` and then never reads."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect, so the window stays small
    sock.settimeout(BOUND)
    sock.connect((host, int(port)))
    sock.sendall(request)
    return sock


class EndlessStream:
    """An ASGI app streaming 64 KiB chunks until the client disconnects: it outgrows any socket buffer.

    `ended` is set once a stream has seen its disconnect and returned."""

    def __init__(self) -> None:
        self.ended = threading.Event()

    async def __call__(self, scope: dict, receive, send) -> None:
        assert scope["type"] == "http"
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            chunk = b"x" * 65536
            while not gone.is_set():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await asyncio.sleep(0)  # uvicorn drops sends after a disconnect without yielding; let `watch` run
        finally:
            watcher.cancel()
            self.ended.set()
