"""The engine loop apart from how it is reached: commands in (`engine.commands`), events out (`engine.events`),
over a thread or a process (the transports are the server's: `server.transport`, `server.engine_process`).

`run_engine_loop` drains the commands (Add | Abort | Probe | Stop) before every step, blocks on them only while
the engine is idle (waking for the nearest request deadline), expires the requests whose deadline has passed,
runs one `Engine.step()` and emits one event per step:

- `Outputs` once per step (and once, with no stats, when the engine goes idle);
- `AddRefused` when an Add is refused (a ValueError from the engine, with an InvalidParam's field);
- `BatchFailed` when one forward failed (an exception carrying `request_ids`): those requests are aborted and the
  loop goes on;
- `Expired` when requests reached their deadline (`Add.deadline`): they are aborted in the engine (KV freed)
  before the next step, whether or not anyone is reading their outputs;
- `ProbeDone` after a readiness probe forward;
- nothing for `ResetPrefixCache`: it is applied in order with the other commands, so a request sent after it
  never reads a block cached before it;
- `Dead` when anything else escapes: the loop ends.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable
from typing import Protocol

from engine.commands import Abort, Add, Command, Probe, ResetPrefixCache, Stop
from engine.events import AddRefused, BatchFailed, Dead, Emit, Expired, Outputs, ProbeDone, Snapshot
from engine.sequence import RequestOutput, SamplingParams, StepStats

log = logging.getLogger("trimode.server")

# get(block, timeout): the next command; None when none came (not blocking, or blocking for `timeout` seconds;
# timeout None blocks until one comes)
GetCommand = Callable[[bool, "float | None"], "Command | None"]


class LoopEngine(Protocol):
    """What the loop needs of an engine (`engine.engine.Engine`; the tests' fakes)."""

    last_stats: StepStats
    num_running: int
    num_waiting: int
    kv_cache_usage: float

    def admit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
              arrival_time: float | None = None) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def has_unfinished(self) -> bool: ...

    def step(self) -> list[RequestOutput]: ...

    def probe(self) -> None: ...

    def reset_prefix_cache(self) -> int: ...


def _snapshot(engine: LoopEngine) -> Snapshot:
    return Snapshot(engine.num_running, engine.num_waiting, float(engine.kv_cache_usage))


class Deadlines:
    """The engine's requests that have a deadline: a dict for membership, a heap (with stale entries skipped) for
    the nearest one."""

    def __init__(self) -> None:
        self._at: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._at)

    def add(self, request_id: str, deadline: float) -> None:
        self._at[request_id] = deadline
        heapq.heappush(self._heap, (deadline, request_id))

    def discard(self, request_id: str) -> None:
        if self._at.pop(request_id, None) is not None and len(self._heap) > 2 * len(self._at) + 64:
            self._heap = [(d, r) for d, r in self._heap if self._at.get(r) == d]  # finished ones: bounded memory
            heapq.heapify(self._heap)

    def _prune(self) -> None:
        while self._heap and self._at.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)

    def pop_due(self, now: float) -> list[str]:
        """Remove and return the requests whose deadline is at or before `now`."""
        due = []
        self._prune()
        while self._heap and self._heap[0][0] <= now:
            _, request_id = heapq.heappop(self._heap)
            del self._at[request_id]
            due.append(request_id)
            self._prune()
        return due

    def wait(self, now: float) -> float | None:
        """Seconds until the nearest deadline (0 if one has passed); None when there is none."""
        self._prune()
        return max(0.0, self._heap[0][0] - now) if self._heap else None


def _run_command(engine: LoopEngine, cmd: Command, emit: Emit, deadlines: Deadlines) -> bool:
    """Carry out one command; False means stop."""
    if isinstance(cmd, Add):
        try:
            engine.admit(cmd.request_id, cmd.prompt_token_ids, cmd.params, arrival_time=cmd.arrival_time)
        except ValueError as exc:
            emit(AddRefused(cmd.request_id, str(exc), getattr(exc, "field", None)))
        else:
            if cmd.deadline is not None:
                deadlines.add(cmd.request_id, cmd.deadline)
    elif isinstance(cmd, Abort):
        engine.abort_request(cmd.request_id)
        deadlines.discard(cmd.request_id)
    elif isinstance(cmd, Probe):
        try:
            engine.probe()
            emit(ProbeDone(cmd.probe_id, None))
        except Exception as exc:  # a broken forward fails readiness, not the engine
            emit(ProbeDone(cmd.probe_id, f"{type(exc).__name__}: {exc}"))
    elif isinstance(cmd, ResetPrefixCache):
        engine.reset_prefix_cache()
    elif isinstance(cmd, Stop):
        return False
    return True


def _expire(engine: LoopEngine, deadlines: Deadlines, emit: Emit) -> None:
    """Abort (freeing their KV) the requests whose deadline has passed, and report them."""
    due = deadlines.pop_due(time.monotonic())
    if due:
        for request_id in due:
            engine.abort_request(request_id)
        emit(Expired(due, _snapshot(engine)))


def run_engine_loop(engine: LoopEngine, get: GetCommand, emit: Emit) -> None:
    """Serve commands and step the engine until Stop; an unexpected exception emits `Dead` and returns.

    Deadlines are enforced here, not where outputs are read, so a request whose client stopped reading still
    ends on time and frees its KV: due requests are expired before every step, and an idle wait wakes up for
    the nearest deadline."""
    deadlines = Deadlines()
    try:
        while True:
            if not engine.has_unfinished():
                emit(Outputs([], None, 0.0, _snapshot(engine)))
                cmd = get(True, deadlines.wait(time.monotonic()))
                if cmd is not None and not _run_command(engine, cmd, emit, deadlines):
                    return
            while (cmd := get(False, None)) is not None:
                if not _run_command(engine, cmd, emit, deadlines):
                    return
            if deadlines:
                _expire(engine, deadlines, emit)
            if not engine.has_unfinished():
                continue
            t0 = time.monotonic()
            try:
                outputs = engine.step()
            except Exception as exc:
                # engine.engine.BatchError, matched by attribute so that tests can inject their own
                failed = getattr(exc, "request_ids", None)
                if failed is None:
                    raise
                # NOTE: a batch-scoped failure: only those requests fail (their blocks are freed)
                log.error("forward failed for %d request(s): %s", len(failed), exc)
                for request_id in failed:
                    engine.abort_request(request_id)
                    deadlines.discard(request_id)
                emit(BatchFailed(list(failed), str(exc), _snapshot(engine)))
                continue
            if deadlines:
                for out in outputs:
                    if out.finish_reason is not None:
                        deadlines.discard(out.request_id)
            emit(Outputs(outputs, engine.last_stats, time.monotonic() - t0, _snapshot(engine)))
    except Exception as exc:
        log.exception("engine loop died")
        emit(Dead(type(exc).__name__))
