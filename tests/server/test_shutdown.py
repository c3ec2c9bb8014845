"""Bounded shutdown: after the drain deadline, connections that have not finished are reset and the server exits,
whatever its clients do: one that never reads its response, one that never finishes sending its request.

Each test first makes sure the client really holds the server (its writes are blocked, or its request is in
flight), so that stock uvicorn, which waits for every connection without limit, would never exit.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from server.async_engine import AsyncEngine
from server.config import ServerConfig
from server.drain import make_server
from tests.server.conftest import make_engine
from tests.server.raw_clients import EndlessStream, connect, non_reading_client, read_until_eof
from tests.server_fixtures import free_port, running, wait_until_healthy

ROOT = Path(__file__).parents[2]
EXIT_BOUND = 30.0  # seconds after the signal; the drain deadline under test is 1 s or less


def wait_for(predicate, what: str, bound: float = 30.0) -> None:
    deadline = time.monotonic() + bound
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_an_in_flight_client_that_never_reads_cannot_hold_the_shutdown(ckpt: Path) -> None:
    port = free_port()
    app = EndlessStream()
    cfg = ServerConfig(port=port, shutdown_timeout=0.5, write_timeout=600, log_level="warning")
    server = make_server(app, cfg, AsyncEngine(make_engine(ckpt)), lifespan="off")
    with running(server) as thread, non_reading_client(f"http://127.0.0.1:{port}",
                                                        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") as sock:
        wait_for(lambda: any(c.flow is not None and c.flow.write_paused for c in list(server.server_state.connections)),
                 "the stream never filled the socket buffers")  # from here on its handler waits for a reader
        server.handle_exit(signal.SIGTERM, None)
        thread.join(EXIT_BOUND)
        assert not thread.is_alive(), "the server did not shut down: a client that never reads held it"
        assert app.ended.is_set() and not server.server_state.connections
        with pytest.raises(ConnectionResetError):
            read_until_eof(sock)


def bytes_waiting(sock: socket.socket) -> int:
    """Bytes the kernel holds for `sock` that it has not read (nothing is consumed)."""
    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)


def test_sigterm_exits_zero_while_clients_hold_a_stream_unread_and_a_body_unsent(ckpt: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--model", str(ckpt), "--port", str(port),
         "--engine.device", "cpu", "--engine.num_kv_tokens", "4096", "--shutdown-timeout", "1",
         # only the shutdown may end these clients' connections: the per-connection deadlines are far away
         "--server.body_timeout", "600", "--server.write_timeout", "600"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    failure: BaseException | None = None
    try:
        wait_until_healthy(proc, url)
        body = b'{"prompt": "hold", "max_tokens": 400, "temperature": 0, "ignore_eos": true, "stream": true, "n": 4}'
        reader = non_reading_client(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                    b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        sender = connect(url)
        with reader, sender:
            # the sender's connection is accepted (it got an answer), then its next request stays in flight
            sender.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while b'{"status":"ok"}' not in got:
                got += sender.recv(65536)
            sender.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 100\r\n\r\n{\"")
            wait_for(lambda: bytes_waiting(reader) > 0, "the stream never started")  # read by nobody
            proc.send_signal(signal.SIGTERM)
            proc.wait(EXIT_BOUND)
    except (AssertionError, OSError, subprocess.TimeoutExpired) as exc:
        failure = exc
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.communicate()[0]
    assert failure is None and proc.returncode == 0, f"{failure!r}, exit {proc.returncode}; the server said:\n{out}"
    assert "signal 15: draining" in out and "aborting" in out and "Traceback" not in out, out
