"""Connection hygiene on the server `trimode serve` runs: header, body and write deadlines, the connection cap,
the open-files bound on it, and the throttle on per-connection log records (accept() errors).

Every wait here is for an event (the server closing a socket, a response arriving), under a generous bound; the
deadlines under test are tiny, so a test never bets on the machine being fast or slow.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import time
from pathlib import Path

import httpx
import pytest

from server import log_throttle
from server.app import create_app
from server.async_engine import AsyncEngine
from server.config import ServerConfig
from server.drain import make_server
from server.http_protocol import FD_RESERVE, effective_max_connections
from tests.server.conftest import make_engine
from tests.server.raw_clients import BOUND, EndlessStream, connect, non_reading_client, parse_response, read_until_eof
from tests.server_fixtures import free_port, live_server, running


@pytest.fixture(scope="module")
def engine(ckpt: Path):
    return make_engine(ckpt, num_kv_tokens=4096)


def test_half_sent_headers_are_closed_after_header_timeout(engine) -> None:
    # the complete request must be read before the timer fires even on a loaded machine: a timeout well above
    # an event-loop stall; the half-sent requests below can never complete, so their close is certain
    cfg = ServerConfig(header_timeout=2.0, log_level="warning")
    with live_server(create_app(engine, cfg), config=cfg) as url:
        with connect(url) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: the headers never end
            assert read_until_eof(sock) == b""  # closed, without a response
        with connect(url) as sock:  # keep-alive: the deadline restarts at the previous response
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while not first.endswith(b'{"status":"ok"}'):
                first += sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /health HTTP/1.1\r\nHo")
            assert read_until_eof(sock) == b""
        assert httpx.get(f"{url}/health", timeout=BOUND).status_code == 200


def test_stalled_body_gets_408_in_openai_shape_and_is_closed(engine) -> None:
    cfg = ServerConfig(body_timeout=0.2, log_level="warning")
    with live_server(create_app(engine, cfg), config=cfg) as url:
        with connect(url) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"")  # 2 of 100 bytes, then nothing
            status, headers, body = parse_response(read_until_eof(sock))
        assert status == 408 and headers["connection"] == "close"
        err = json.loads(body)["error"]
        assert err["code"] == 408 and "body_timeout" in err["message"] and set(err) == {"message", "type", "param",
                                                                                        "code"}
        assert err["type"] == "RequestTimeoutError"
        r = httpx.post(f"{url}/tokenize", json={"prompt": "ok"}, timeout=BOUND)
        assert r.status_code == 200 and r.json()["count"] >= 2  # whole bodies are unaffected


def test_at_the_cap_the_connection_waiting_longest_for_headers_makes_room(engine) -> None:
    cap = 3
    cfg = ServerConfig(max_connections=cap, header_timeout=600, log_level="warning")
    with live_server(create_app(engine, cfg), config=cfg) as url:
        held = [connect(url) for _ in range(cap)]  # accepted in this order
        try:
            for sock in held:
                sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # half-sent headers, as a slowloris sends them
            r = httpx.get(f"{url}/health", timeout=BOUND)
            assert r.status_code == 200 and r.json() == {"status": "ok"}
            assert read_until_eof(held[0]) == b""  # the oldest was closed to admit the probe
        finally:
            for sock in held:
                sock.close()


def start_upload(url: str) -> socket.socket:
    """A connection with a request in progress: headers read by the handler (it asked for the body), body unsent."""
    sock = connect(url)
    sock.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")
    got = b""
    while not got.endswith(b"\r\n\r\n"):
        got += sock.recv(1)
    assert got.startswith(b"HTTP/1.1 100 ")
    return sock


def health(url: str) -> int | str:
    try:
        r = httpx.get(f"{url}/health", timeout=BOUND)
    except httpx.TransportError as exc:
        return type(exc).__name__
    assert r.status_code != 200 or r.json() == {"status": "ok"}
    return r.status_code


def test_over_the_cap_with_every_request_in_progress_gets_503_then_a_freed_slot_serves(engine) -> None:
    cap = 3
    cfg = ServerConfig(max_connections=cap, body_timeout=600, retry_after=7, log_level="warning")
    with live_server(create_app(engine, cfg), config=cfg) as url:
        busy = [start_upload(url) for _ in range(cap)]
        try:
            with connect(url) as extra:  # read without sending: the 503 cannot be lost to a reset
                status, headers, body = parse_response(read_until_eof(extra))
            assert status == 503 and headers["retry-after"] == "7" and headers["connection"] == "close"
            err = json.loads(body)["error"]
            assert err["code"] == 503 and err["type"] == "ServiceUnavailableError" and "retry later" in err["message"]

            busy.pop().close()
            deadline = time.monotonic() + BOUND
            while (status := health(url)) != 200:  # refused (503 or reset) until the server sees the close
                assert time.monotonic() < deadline, f"the closed connection's slot was never freed ({status})"
        finally:
            for sock in busy:
                sock.close()


def test_a_client_that_stops_reading_is_dropped_after_write_timeout(engine) -> None:
    port = free_port()
    app = EndlessStream()
    server = make_server(app, ServerConfig(port=port, write_timeout=0.2, log_level="warning"), AsyncEngine(engine),
                         lifespan="off")
    with running(server), non_reading_client(f"http://127.0.0.1:{port}", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") as sock:
        # the stream cannot end by itself: only the dropped connection's disconnect ends it
        assert app.ended.wait(30), "the connection of a client that reads nothing was never dropped"
        assert not server.server_state.connections
        with pytest.raises(ConnectionResetError):  # reset: what was never read is discarded, not delivered later
            read_until_eof(sock)


def test_max_connections_is_kept_below_the_open_files_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    from server import http_protocol

    limits: list[tuple[int, int]] = []

    def setrlimit(_: int, value: tuple[int, int]) -> None:
        if value[0] > value[1] != resource.RLIM_INFINITY:
            raise ValueError("not allowed")
        limits.append(value)

    monkeypatch.setattr(http_protocol.resource, "setrlimit", setrlimit)
    rlimit = (FD_RESERVE + 1000, FD_RESERVE + 1000)  # soft == hard: nothing to raise
    monkeypatch.setattr(http_protocol.resource, "getrlimit", lambda _: rlimit)
    capped = effective_max_connections(1 << 20)
    assert 1 <= capped <= 1000 and not limits  # minus the descriptors already open
    assert effective_max_connections(10) == 10
    rlimit = (16, 16)
    assert effective_max_connections(100) == 1
    rlimit = (16, 1 << 20)  # a soft limit below the hard one is raised as far as needed, no further
    assert effective_max_connections(100) == 100
    assert len(limits) == 1 and FD_RESERVE + 100 < limits[0][0] < FD_RESERVE + 100 + 10_000
    assert limits[0][1] == 1 << 20
    rlimit = (resource.RLIM_INFINITY,) * 2
    assert effective_max_connections(100) == 100


@pytest.mark.parametrize("field,value", [("header_timeout", 0), ("body_timeout", -1.0), ("write_timeout", 0.0),
                                         ("max_connections", 0)])
def test_connection_settings_are_checked(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        ServerConfig(**{field: value})


def accept_error(err: int = errno.EMFILE) -> logging.LogRecord:
    """The record asyncio's default exception handler logs for each failed accept()."""
    exc = OSError(err, "Too many open files")
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                             "socket.accept() out of system resource\nsocket: <TransportSocket fd=6>", None,
                             (OSError, exc, None))


def test_accept_errors_are_logged_once_per_interval_with_a_count() -> None:
    now = [100.0]
    throttle = log_throttle.ThrottleFilter(log_throttle.accept_error_key, interval=10.0, clock=lambda: now[0])
    assert throttle.filter(accept_error())
    assert [throttle.filter(accept_error()) for _ in range(999)] == [False] * 999
    assert throttle.filter(accept_error(errno.ENFILE))  # another errno is another kind
    other = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Task exception was never retrieved", None,
                              None)
    assert all(throttle.filter(other) for _ in range(3))  # anything else passes untouched
    now[0] += 9.9
    assert not throttle.filter(accept_error())
    now[0] += 0.1
    record = accept_error()
    assert throttle.filter(record)
    assert record.getMessage().startswith("socket.accept() out of system resource")
    assert "[1000 similar message(s) suppressed in the last 10s]" in record.getMessage()
    assert throttle.suppressed_total == 1000
    now[0] += 10.0
    quiet = accept_error()
    assert throttle.filter(quiet) and "suppressed" not in quiet.getMessage()


def test_the_server_installs_the_throttles(engine) -> None:
    cfg = ServerConfig(log_level="warning")
    with live_server(create_app(engine, cfg), config=cfg):
        for name, key in (("asyncio", log_throttle.accept_error_key),
                          ("trimode.server.connections", log_throttle.template_key)):
            throttles = [f for f in logging.getLogger(name).filters if isinstance(f, log_throttle.ThrottleFilter)]
            assert len(throttles) == 1 and throttles[0].key is key
