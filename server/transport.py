"""EngineTransport: how the server reaches the engine loop, whatever carries it. One typed interface for the two
transports: `ThreadTransport` (the Engine in a thread of the server process, here) and
`server.engine_process.EngineProcess` (the Engine in its own process, so its Python never shares a GIL with the
event loop). The asyncio side (`server.async_engine`) only ever sees `EngineTransport`.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Protocol, runtime_checkable

from engine.commands import Command, Stop
from engine.events import Emit
from engine.loop import LoopEngine, run_engine_loop
from engine.policy import RequestPolicy


@runtime_checkable
class EngineTransport(Protocol):
    """What the asyncio side needs from an engine: the facts to check requests with (no model needed), commands
    down, events up, and whether a dead engine can be replaced."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def policy(self) -> RequestPolicy | None:
        """The engine's request policy; None only for a test fake (no request checks, no admission by pages)."""

    @property
    def can_respawn(self) -> bool:
        """Whether `respawn` can replace a dead engine (a process can; a thread's engine cannot)."""

    def start(self, emit: Emit) -> None:
        """Start the loop; `emit(event)` is called from a non-event-loop thread for every event."""

    def send(self, cmd: Command) -> None:
        """Queue a command (non-blocking, callable from the event loop)."""

    def stop(self, timeout: float) -> None:
        """Stop the loop and wait up to `timeout` seconds."""

    def respawn(self) -> None:
        """Replace a dead engine with a fresh one (blocking while it loads); `start` again afterwards."""


class ThreadTransport:
    """The Engine in a daemon thread of this process; commands through a SimpleQueue.

    It cannot respawn: an exception that escaped the loop leaves the Engine's state unknown, and a thread cannot
    be killed."""

    can_respawn = False

    def __init__(self, engine: LoopEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer  # type: ignore[attr-defined]

    @property
    def model_name(self) -> str:
        return self.engine.model_name  # type: ignore[attr-defined]

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len  # type: ignore[attr-defined]

    @property
    def policy(self) -> RequestPolicy | None:
        return getattr(self.engine, "policy", None)  # an Engine's; test fakes have none

    def _get(self, block: bool, timeout: float | None = None) -> Command | None:
        try:
            return self._inbox.get(block, timeout)
        except queue.Empty:
            return None

    def start(self, emit: Emit) -> None:
        self._thread = threading.Thread(target=run_engine_loop, args=(self.engine, self._get, emit),
                                        name="trimode-engine", daemon=True)
        self._thread.start()

    def send(self, cmd: Command) -> None:
        self._inbox.put(cmd)

    def stop(self, timeout: float) -> None:
        self._inbox.put(Stop())
        if self._thread is not None:
            self._thread.join(timeout)

    def respawn(self) -> None:
        raise RuntimeError("an engine in a thread of the server cannot be respawned")
