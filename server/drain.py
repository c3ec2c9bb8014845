"""DrainingServer: uvicorn with a graceful drain on SIGTERM / SIGINT, then exit status 0.

uvicorn's own handler stops listening at once and re-raises the signal after shutdown (exit status -15). Here
the first signal keeps the socket open so that new requests and readiness get 503, waits up to the
shutdown timeout for in-flight requests, aborts what is left, and only then lets uvicorn shut down. A second
signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn

from server.async_engine import AsyncEngine

log = logging.getLogger("trimode.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, aeng: AsyncEngine, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.aeng = aeng
        self.shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._drain_task is not None or self.aeng.draining:
            self.should_exit = True
            self.force_exit = self._drain_task is not None
            return
        log.info("signal %d: draining (up to %.1fs for %d in-flight request(s))", sig, self.shutdown_timeout,
                 self.aeng.num_inflight)
        self.aeng.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await self.aeng.drain(self.shutdown_timeout)
        log.info("drained; shutting down")
        self.should_exit = True
