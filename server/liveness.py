"""EngineWatch: what the event loop knows about the engine's pulse, for /health and /ready.

The engine sends one event per step (and one when it goes idle), so silence while work is in flight means the
engine is stuck in a step: a hung forward, a deadlock, a swapped-out process. That is decided here from event
times alone, never by asking the engine (which could not answer), so it holds for a thread or a process alike.
Readiness is a real forward; one that completed recently (a step that ran a batch, or a probe) answers it.
"""

from __future__ import annotations

import math
import time

from engine.events import Event, Outputs, ProbeDone


class EngineWatch:
    """Event times of one engine. `stall_timeout` None turns stall detection off; `ready_cache_seconds` is how old
    a completed forward may be and still prove readiness (0: every readiness check runs its own probe)."""

    def __init__(self, stall_timeout: float | None, ready_cache_seconds: float) -> None:
        self.stall_timeout = stall_timeout
        self.ready_cache_seconds = ready_cache_seconds
        self.last_event = time.monotonic()
        self.last_forward = -math.inf  # no forward proven yet: the first readiness check probes
        self._quiet_from = self.last_event  # the later of the last event and the moment idle work arrived

    def on_event(self, event: Event) -> bool:
        """Record one engine event (on the event loop); True when it proves a completed forward."""
        now = time.monotonic()
        self.last_event = self._quiet_from = now
        ran = (isinstance(event, Outputs) and event.ran_forward) or \
            (isinstance(event, ProbeDone) and event.error is None)
        if ran:
            self.last_forward = now
        return ran

    def work_arrived(self, had_work: bool) -> None:
        """Work was handed to the engine; an engine idle until now has stall_timeout from here to answer."""
        if not had_work:
            self._quiet_from = max(self._quiet_from, time.monotonic())

    def stalled_for(self, has_work: bool) -> float | None:
        """Seconds the engine has been silent with work in flight, once that passes stall_timeout; else None."""
        if not has_work or self.stall_timeout is None:
            return None
        quiet = time.monotonic() - self._quiet_from
        return quiet if quiet > self.stall_timeout else None

    def ready_cached(self) -> bool:
        """A forward completed within ready_cache_seconds: readiness needs no probe of its own."""
        return time.monotonic() - self.last_forward <= self.ready_cache_seconds

    def engine_replaced(self) -> None:
        """The engine died or was respawned: nothing it proved before counts."""
        self.last_forward = -math.inf
        self.last_event = self._quiet_from = time.monotonic()
