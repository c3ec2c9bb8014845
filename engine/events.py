"""The engine loop's events, engine -> server: `Outputs`, `AddRefused`, `BatchFailed`, `Expired`, `ProbeDone`,
`Dead`, and the gauges (`Snapshot`) they carry; `Emit` is how the loop sends them (`engine.commands` go the other
way).

Plain picklable dataclasses, torch-free: they cross a thread's queue or the engine process's pipes as they are, and
the server process (which never imports torch) reads them. `engine.loop` says when each event is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.sequence import RequestOutput, StepStats


@dataclass(slots=True)
class Snapshot:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0


@dataclass(slots=True)
class Outputs:
    """One engine step's outputs (sent once per step, and once with none when the engine goes idle); `stats` is
    None for the idle one."""

    outputs: list[RequestOutput]
    stats: StepStats | None
    step_seconds: float
    snapshot: Snapshot

    @property
    def ran_forward(self) -> bool:
        """Whether this step ran a forward (a step that found nothing to run has no forward kind)."""
        return self.stats is not None and self.stats.forward_kind is not None


@dataclass(slots=True)
class AddRefused:
    """The engine refused an Add (a ValueError); `field` is an InvalidParam's field, or None."""

    request_id: str
    message: str
    field: str | None


@dataclass(slots=True)
class BatchFailed:
    """One forward failed (an exception carrying `request_ids`): those requests were aborted; the loop goes on."""

    request_ids: list[str]
    message: str
    snapshot: Snapshot


@dataclass(slots=True)
class Expired:
    """Requests that reached their deadline (`Add.deadline`), aborted in the engine (KV freed) before a step."""

    request_ids: list[str]
    snapshot: Snapshot


@dataclass(slots=True)
class ProbeDone:
    """A readiness probe forward ran; `error` is None, or what it raised."""

    probe_id: int
    error: str | None


@dataclass(slots=True)
class Dead:
    """Something else escaped the loop, which has ended."""

    reason: str


Event = Outputs | AddRefused | BatchFailed | Expired | ProbeDone | Dead
Emit = Callable[[Event], None]
