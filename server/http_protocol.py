"""GuardedH11Protocol: uvicorn's h11 protocol with the connection hygiene a public server needs.

Stock uvicorn holds a half-sent request forever and accepts connections until the process runs out of file
descriptors. This subclass (pinned with `http=`, whatever parsers are installed) adds, per connection:

- a header deadline: the complete request headers must arrive within `header_timeout` of connecting, or of the
  previous response on a keep-alive connection; otherwise the connection is closed without a response (an idle
  keep-alive connection must not receive an unsolicited one);
- a body deadline: the whole request body must arrive within `body_timeout` of its headers (a total, so a client
  dripping a byte at a time cannot stretch it); otherwise 408 in OpenAI's error shape, then close;
- a write deadline: a response whose unsent bytes make no progress for `write_timeout` seconds because the client
  stopped reading (also the last bytes of a closed connection) resets the connection; its handler sees a
  disconnect and aborts its engine work;
- a connection cap, `max_connections`. A new connection over it first takes the place of the connection that has
  waited longest for request headers (idle keep-alive or half-sent), which is closed: connections that send no
  request cannot lock out those that do, so /health keeps answering through a slowloris flood. Only when every
  connection has a request in progress does a new one get 503 in OpenAI's shape with Retry-After and
  `Connection: close`, then a lingering close (response written, write side shut, what the client still sends
  read and discarded for up to LINGER_S) so that the client reads the 503 rather than a reset. At most
  REJECT_SLOTS refusals linger at once; beyond that a connection is reset at once, so a flood cannot spend file
  descriptors on refusals either.

`effective_max_connections` keeps the cap, plus what a burst of accepts can take before the cap acts, below the
open-files limit; `make_server` (server.drain) listens with ACCEPT_BACKLOG, which bounds that burst. Timeouts and
refusals are logged on `trimode.server.connections`, throttled by `server.log_throttle`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.protocol import error_body

log = logging.getLogger("trimode.server.connections")

REJECT_SLOTS = 32  # refused connections lingering at once (each holds a file descriptor for up to LINGER_S)
LINGER_S = 1.0
ACCEPT_BACKLOG = 128  # the listen queue, and the most connections asyncio accepts in one loop iteration
# Descriptors kept free beyond the cap: the engine's pipes, logs and restarts (64), lingering refusals, and a
# flood's connections that the count does not hold yet or any more: accepted but not yet counted (asyncio accepts up
# to a backlog per iteration of the event loop, and connection_made comes two iterations later) or closed to make
# room but not yet released (one iteration).
FD_RESERVE = 64 + REJECT_SLOTS + 4 * ACCEPT_BACKLOG


@dataclass
class ConnectionGuard:
    """The limits one server's connections share, the connections awaiting headers, the refusals lingering."""

    header_timeout: float
    body_timeout: float
    write_timeout: float
    max_connections: int
    retry_after: int
    rejecting: set[asyncio.Transport] = field(default_factory=set)
    # connections awaiting a request's headers, oldest deadline first: the ones closed to admit a new connection
    waiting: dict[GuardedH11Protocol, None] = field(default_factory=dict)


def effective_max_connections(configured: int) -> int:
    """`configured`, or fewer: the open-files soft limit minus the descriptors already open and FD_RESERVE.

    A soft limit too low for `configured` is first raised as far as the hard limit allows (as Go's runtime does);
    what is still missing lowers the cap, with a warning."""
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # no procfs: count nothing already open, the reserve still applies
        in_use = 0
    need = configured + in_use + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need and (hard == resource.RLIM_INFINITY or soft < hard):
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            log.info("raised the open-files soft limit from %d to %d for max_connections %d", soft, raised,
                     configured)
            soft = raised
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files soft limit from %d to %d: %s", soft, raised, exc)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return configured
    cap = max(1, soft - in_use - FD_RESERVE)
    log.warning("max_connections lowered from %d to %d: the open-files limit is %d (%d open, %d kept in reserve); "
                "raise `ulimit -n` for more", configured, cap, soft, in_use, FD_RESERVE)
    return cap


def reset(transport: asyncio.BaseTransport) -> None:
    """Close now with a TCP reset: unsent bytes are dropped here and in the kernel, not left to a peer not reading."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already closed, or not TCP: abort() alone still closes it
    transport.abort()


def protocol_class(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol subclass bound to `guard`: what uvicorn.Config(http=...) instantiates per connection."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})


def _error_events(status: int, reason: bytes, message: str) -> list[h11.Event]:
    """An error response in OpenAI's shape that closes the connection, as h11 events."""
    body = json.dumps(error_body(status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    return [h11.Response(status_code=status, headers=headers, reason=reason), h11.Data(data=body),
            h11.EndOfMessage()]


class _Refusal(asyncio.Protocol):
    """A connection over the cap: 503, shut the write side, discard input until EOF or LINGER_S, close."""

    def __init__(self, guard: ConnectionGuard, payload: bytes) -> None:
        self.guard = guard
        self.payload = payload
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.guard.rejecting.add(transport)
        transport.write(self.payload)
        if transport.can_write_eof():
            transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(LINGER_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not served; reading it keeps the 503 from being destroyed by a reset

    def eof_received(self) -> bool:
        if self.transport is not None:
            self.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.guard.rejecting.discard(self.transport)


class GuardedH11Protocol(H11Protocol):
    guard: ConnectionGuard  # set on the subclass that protocol_class() builds

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._write_mark = 0  # unsent bytes when the write deadline was armed

    # ---- the cap ----------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        guard = self.guard
        if len(self.connections) >= guard.max_connections:
            if not guard.waiting:
                self._refuse(transport)
                return
            oldest = next(iter(guard.waiting))
            log.info("closed the connection waiting longest for request headers: %d open (max_connections %d)",
                     len(self.connections), guard.max_connections)
            oldest._close()
        super().connection_made(transport)
        self._sync_timers()

    def _refuse(self, transport: asyncio.Transport) -> None:
        guard = self.guard
        log.warning("refused a connection: %d open (max_connections %d), each with a request in progress",
                    len(self.connections), guard.max_connections)
        if len(guard.rejecting) >= REJECT_SLOTS:
            transport.abort()
            return
        message = f"The server has {guard.max_connections} open connections, its limit; retry later."
        body = json.dumps(error_body(503, message)).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nretry-after: {guard.retry_after}\r\nconnection: close\r\n\r\n")
        refusal = _Refusal(guard, head.encode() + body)
        transport.set_protocol(refusal)
        refusal.connection_made(transport)

    # ---- deadlines ----------------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._sync_timers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync_timers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        self._cancel("_body_timer")
        self._cancel("_write_timer")
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server is stopping: close when idle, else after the response (uvicorn's), never raising."""
        try:
            super().shutdown()
        except h11.LocalProtocolError:  # a connection h11 already gave up on (a 400 on its way out)
            self.transport.close()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._arm_write_timer()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel("_write_timer")
        self._watch_flush()

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)

    def _stop_header_timer(self) -> None:
        self._cancel("_header_timer")
        self.guard.waiting.pop(self, None)

    def _sync_timers(self) -> None:
        """Arm or cancel the deadlines from h11's view of the client's side.

        A deadline is armed once when its phase begins and never pushed back by progress: the client's state is
        IDLE while the next request's headers are awaited, SEND_BODY while its body is."""
        if self.transport.is_closing():
            self._stop_header_timer()
            self._cancel("_body_timer")
            self._watch_flush()
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(self.guard.header_timeout, self._header_timed_out)
                self.guard.waiting[self] = None
        else:
            self._stop_header_timer()
        if state is h11.SEND_BODY:
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.guard.body_timeout, self._body_timed_out)
        else:
            self._cancel("_body_timer")

    def _watch_flush(self) -> None:
        """A closing connection with unsent bytes waits on its client to read them: for write_timeout at most."""
        if self._write_timer is None and self.transport.is_closing() and self.transport.get_write_buffer_size():
            self._arm_write_timer()

    def _arm_write_timer(self) -> None:
        self._write_mark = self.transport.get_write_buffer_size()
        self._write_timer = self.loop.call_later(self.guard.write_timeout, self._write_timed_out)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        log.info("closed a connection: no complete request headers within header_timeout %gs",
                 self.guard.header_timeout)
        self._close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        log.info("closed a connection: the request body did not arrive within body_timeout %gs",
                 self.guard.body_timeout)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the handler's receive() returns http.disconnect; its sends are dropped
            cycle.message_event.set()
            if not cycle.response_started:
                cycle.response_started = True
                message = f"The request body did not arrive within {self.guard.body_timeout:g} s (body_timeout)."
                for event in _error_events(408, b"Request Timeout", message):
                    self.transport.write(self.conn.send(event) or b"")
        self._close()

    def _write_timed_out(self) -> None:
        self._write_timer = None
        unsent = self.transport.get_write_buffer_size()
        if unsent == 0:
            return  # everything went out after all
        if unsent < self._write_mark:
            self._arm_write_timer()  # the client is reading, slowly: the deadline is for no progress at all
            return
        log.info("dropped a connection: the client read nothing for write_timeout %gs", self.guard.write_timeout)
        reset(self.transport)  # a graceful close would wait for the same unread bytes

    def _close(self) -> None:
        """Close gracefully (what was written is still delivered); a client that does not read it is reset."""
        self._stop_header_timer()
        if self.transport.is_closing():
            return
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass  # mid-response: the transport closes all the same
        self.transport.close()
        self._watch_flush()
