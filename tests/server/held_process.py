"""EventHold: an engine process (`server.engine_process.EngineProcess`) held a bounded number of steps past a
chosen event, from the server process, so a test can act on a request that is certainly unfinished.

The engine process sends one event per step up a pipe and blocks once the pipe is full. EventHold shrinks that
pipe to one page and, once armed, stops the server's reader of it right after delivering the event that brings
the next token: the engine process can then run at most `max_steps_ahead()` more steps (the events a full pipe
holds, plus the one it is sending), however fast it is, until `release()`. Linux only (F_SETPIPE_SZ).
"""

from __future__ import annotations

import fcntl
import threading
from multiprocessing.reduction import ForkingPickler
from typing import Any

from engine.events import Event, Outputs, Snapshot
from engine.sequence import StepStats

PAGE = 4096
BOUND = 60.0  # seconds a held reader waits for release at most (a test that failed must not hang the engine)


def min_event_bytes() -> int:
    """The smallest event a step sends (one that emitted nothing), with the Connection's 4-byte length header."""
    return len(bytes(ForkingPickler.dumps(Outputs([], StepStats(), 0.0, Snapshot())))) + 4


class EventHold:
    def __init__(self, eng: Any) -> None:
        fcntl.fcntl(eng._events.fileno(), fcntl.F_SETPIPE_SZ, PAGE)  # its event pipe's read end (tests only)
        self._start = eng.start
        eng.start = self._start_held  # the AsyncEngine starts the reader with its callback through this
        self._armed = False
        self.held = threading.Event()  # set once the reader is held
        self._release = threading.Event()

    @staticmethod
    def max_steps_ahead() -> int:
        """Steps the engine process can run past the held event: a full pipe's worth, plus one being sent."""
        return PAGE // min_event_bytes() + 1

    def hold_after_next_token(self) -> None:
        self._armed = True

    def release(self) -> None:
        self._release.set()

    def _start_held(self, emit: Any) -> None:
        def held_emit(event: Event) -> None:
            emit(event)
            if self._armed and isinstance(event, Outputs) and any(o.new_token_ids for o in event.outputs):
                self._armed = False
                self.held.set()
                self._release.wait(BOUND)

        self._start(held_emit)
