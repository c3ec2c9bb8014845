"""DrainingServer: uvicorn with a graceful drain on SIGTERM / SIGINT, a bounded shutdown, then exit status 0.

uvicorn's own handler stops listening at once and re-raises the signal after shutdown (exit status -15). Here
the first signal keeps the socket open so that new requests and readiness get 503, waits up to the
shutdown timeout for in-flight requests, aborts what is left, and only then lets uvicorn shut down. A second
signal exits at once.

uvicorn's shutdown then waits, without limit, for every connection to close and every handler to end: one client
that stops reading (its response never leaves the write buffer) or stops sending (its request body never ends)
would keep the process alive forever. Here connections get until the drain deadline plus FLUSH_GRACE_S to finish;
those still open are then reset (`transport.abort()` with SO_LINGER 0: unsent bytes are dropped, not waited on),
handlers still running a second later are cancelled, and the process exits.

`make_server` builds the server the CLI runs: uvicorn pinned to the h11 protocol with the connection guards of
`server.http_protocol`, and the log throttles of `server.log_throttle`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from types import FrameType
from typing import Any

import uvicorn

from server import log_throttle
from server.async_engine import AsyncEngine
from server.config import ServerConfig
from server.http_protocol import ACCEPT_BACKLOG, ConnectionGuard, effective_max_connections, protocol_class, reset

log = logging.getLogger("trimode.server")

FLUSH_GRACE_S = 2.0  # after the drain deadline: time for finished responses to reach clients that do read
TASK_GRACE_S = 1.0  # after the aborts: time for handlers to see their disconnect before they are cancelled


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, async_engine: AsyncEngine, shutdown_timeout: float,
                 guard: ConnectionGuard | None = None) -> None:
        super().__init__(config)
        self.async_engine = async_engine
        self.shutdown_timeout = shutdown_timeout
        self.guard = guard
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._deadline: float | None = None  # monotonic: the signal's time + shutdown_timeout

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        log_throttle.install("asyncio", log_throttle.accept_error_key)
        log_throttle.install("trimode.server.connections", log_throttle.template_key)
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._drain_task is not None or self.async_engine.draining:
            self.should_exit = True
            self.force_exit = self._drain_task is not None
            return
        log.info("signal %d: draining (up to %.1fs for %d in-flight request(s))", sig, self.shutdown_timeout,
                 self.async_engine.num_inflight)
        self._deadline = time.monotonic() + self.shutdown_timeout
        self.async_engine.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await self.async_engine.drain(self.shutdown_timeout)
        log.info("drained; shutting down")
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, with a bound on the wait for connections and handlers (see the module docstring)."""
        log.info("shutting down")
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        state = self.server_state
        for connection in list(state.connections):
            connection.shutdown()  # idle connections close now; busy ones close after their response
        now = time.monotonic()
        close_by = max(self._deadline or now, now) + FLUSH_GRACE_S
        while (state.connections or state.tasks) and not self.force_exit and time.monotonic() < close_by:
            await asyncio.sleep(0.05)
        left = [c.transport for c in state.connections if c.transport is not None]
        left += list(self.guard.rejecting) if self.guard is not None else []
        if left:
            log.warning("shutdown: aborting %d connection(s) that did not finish (a client not reading its "
                        "response or not sending its request)", len(left))
            for transport in left:
                reset(transport)
        if state.tasks:
            await asyncio.wait(set(state.tasks), timeout=TASK_GRACE_S)
        if state.tasks:
            log.warning("shutdown: cancelling %d request handler(s)", len(state.tasks))
            for task in list(state.tasks):
                task.cancel()
            await asyncio.wait(set(state.tasks), timeout=TASK_GRACE_S)
        if not self.force_exit:
            await self.lifespan.shutdown()


def make_server(app: Any, cfg: ServerConfig, async_engine: AsyncEngine | None = None,
                lifespan: str = "on") -> DrainingServer:
    """The trimode HTTP server for `app` (its AsyncEngine is `app.state.async_engine` unless given) as configured by
    `cfg`."""
    guard = ConnectionGuard(header_timeout=cfg.header_timeout, body_timeout=cfg.body_timeout,
                            write_timeout=cfg.write_timeout,
                            max_connections=effective_max_connections(cfg.max_connections),
                            retry_after=cfg.retry_after)
    # http pinned: the guards live in the h11 protocol, whichever parsers are installed; no websocket routes
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            access_log=cfg.log_level == "debug", lifespan=lifespan, http=protocol_class(guard),
                            ws="none", backlog=ACCEPT_BACKLOG)
    return DrainingServer(config, async_engine if async_engine is not None else app.state.async_engine,
                          cfg.shutdown_timeout, guard)
