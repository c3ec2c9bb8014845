"""StepGate: a test's hand on an in-process Engine's steps, so deadlines and races are certain, not likely.

`StepGate(engine)` shadows `engine.step` with a version that waits for a permit before each real step. Closed
(the default), the engine cannot make progress: a request admitted then cannot finish before any deadline, however
fast the machine. `allow(n)` lets exactly n steps run, `open()` lets every step run, `close()` stops them again,
and `remove()` (or leaving the `with` block) restores the real method and lets a waiting step through.
`steps_started` counts steps that got a permit; `wait_blocked()` returns once the engine is parked at the gate.
"""

from __future__ import annotations

import threading
from typing import Any


class StepGate:
    def __init__(self, engine: Any, open_: bool = False) -> None:
        self.engine = engine
        self._real = engine.step
        self._cond = threading.Condition()
        self._permits = 0
        self._open = open_
        self._removed = False
        self._blocked = False
        self.steps_started = 0
        engine.step = self._step

    def _step(self) -> list:
        with self._cond:
            self._blocked = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._open or self._removed or self._permits > 0)
            self._blocked = False
            if not (self._open or self._removed):
                self._permits -= 1
            self.steps_started += 1
        return self._real()

    def allow(self, n: int = 1) -> None:
        with self._cond:
            self._permits += n
            self._cond.notify_all()

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._open = False
            self._permits = 0

    def wait_blocked(self, timeout: float = 30.0) -> bool:
        """True once the engine thread is waiting at the gate (it has work and no permit)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._blocked, timeout)

    def remove(self) -> None:
        with self._cond:
            self._removed = True
            self._cond.notify_all()
        if self.engine.__dict__.get("step") == self._step:
            del self.engine.step

    def __enter__(self) -> StepGate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
