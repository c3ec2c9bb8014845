"""The engine loop's commands, server -> engine: `Add`, `Abort`, `Probe`, `ResetPrefixCache`, `Stop` (the events
coming back are in `engine.events`).

Plain picklable dataclasses, torch-free: they cross a thread's queue or the engine process's pipes as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.sequence import SamplingParams


@dataclass(slots=True)
class Add:
    """Admit a request whose `params` the server resolved and checked with the engine's `RequestPolicy`."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    # absolute time.monotonic() after which the engine aborts the request; None = no deadline. Valid in the engine
    # process too: time.monotonic() is CLOCK_MONOTONIC, one system-wide clock on Linux (mach_absolute_time on
    # macOS is system-wide as well), not a per-process one
    deadline: float | None = None


@dataclass(slots=True)
class Abort:
    request_id: str


@dataclass(slots=True)
class Probe:
    probe_id: int


@dataclass(slots=True)
class Stop:
    pass


@dataclass(slots=True)
class ResetPrefixCache:
    """Forget every cached KV block (POST /reset_prefix_cache)."""


Command = Add | Abort | Probe | ResetPrefixCache | Stop
