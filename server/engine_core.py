"""The engine loop apart from how it is reached: commands in, events out, over a thread or a process.

`run_engine_loop` drains the commands (Add | Abort | Probe | Stop) before every step, blocks on them only while
the engine is idle (waking for the nearest request deadline), expires the requests whose deadline has passed,
runs one `Engine.step()` and emits one event per step. Events are plain picklable tuples `(name, *args)`:

- `("outputs", outputs, stats, step_seconds, snapshot)` once per step (and once when the engine goes idle);
- `("fail_request", request_id, message)` when an Add is refused (a ValueError from the engine);
- `("fail_requests", request_ids, message, snapshot)` when one forward failed (an exception carrying
  `request_ids`): those requests are aborted and the loop goes on;
- `("expired", request_ids, snapshot)` when requests reached their deadline (`Add.deadline`): they are aborted
  in the engine (KV freed) before the next step, whether or not anyone is reading their outputs;
- `("probe", probe_id, error_or_None)` after a readiness probe forward;
- nothing for `ResetPrefixCache`: it is applied in order with the other commands, so a request sent after it
  never reads a block cached before it;
- `("dead", reason)` when anything else escapes: the loop ends.

Two transports implement `Core`: `ThreadCore` (the Engine in a thread of the server process) and
`server.engine_process.EngineProcess` (the Engine in its own process, so its Python never shares a GIL with the
event loop). The asyncio side (`server.async_engine`) only ever sees `Core`.
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.sequence import SamplingParams

log = logging.getLogger("trimode.server")


@dataclass(slots=True)
class Add:
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


Command = Add | Abort | Probe | Stop | ResetPrefixCache
Emit = Callable[..., None]  # emit(event_name, *args)
# get(block, timeout): the next command; None when none came (not blocking, or blocking for `timeout` seconds;
# timeout None blocks until one comes)
GetCommand = Callable[[bool, "float | None"], "Command | None"]


@dataclass(slots=True)
class Snapshot:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0


def _snapshot(engine: Any) -> Snapshot:
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


def _apply(engine: Any, cmd: Command, emit: Emit, deadlines: Deadlines) -> bool:
    """Apply one command; False means stop."""
    if isinstance(cmd, Add):
        try:
            engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params, arrival_time=cmd.arrival_time)
        except ValueError as exc:
            emit("fail_request", cmd.request_id, str(exc))
        else:
            if cmd.deadline is not None:
                deadlines.add(cmd.request_id, cmd.deadline)
    elif isinstance(cmd, Abort):
        engine.abort_request(cmd.request_id)
        deadlines.discard(cmd.request_id)
    elif isinstance(cmd, Probe):
        try:
            engine.probe()
            emit("probe", cmd.probe_id, None)
        except Exception as exc:  # a broken forward fails readiness, not the engine
            emit("probe", cmd.probe_id, f"{type(exc).__name__}: {exc}")
    elif isinstance(cmd, ResetPrefixCache):
        engine.reset_prefix_cache()
    elif isinstance(cmd, Stop):
        return False
    return True


def _expire(engine: Any, deadlines: Deadlines, emit: Emit) -> None:
    """Abort (freeing their KV) the requests whose deadline has passed, and report them."""
    due = deadlines.pop_due(time.monotonic())
    if due:
        for request_id in due:
            engine.abort_request(request_id)
        emit("expired", due, _snapshot(engine))


def run_engine_loop(engine: Any, get: GetCommand, emit: Emit) -> None:
    """Serve commands and step the engine until Stop; an unexpected exception emits "dead" and returns.

    Deadlines are enforced here, not where outputs are read, so a request whose client stopped reading still
    ends on time and frees its KV: due requests are expired before every step, and an idle wait wakes up for
    the nearest deadline."""
    deadlines = Deadlines()
    try:
        while True:
            if not engine.has_unfinished():
                emit("outputs", [], None, 0.0, _snapshot(engine))
                cmd = get(True, deadlines.wait(time.monotonic()))
                if cmd is not None and not _apply(engine, cmd, emit, deadlines):
                    return
            while (cmd := get(False, None)) is not None:
                if not _apply(engine, cmd, emit, deadlines):
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
                emit("fail_requests", list(failed), str(exc), _snapshot(engine))
                continue
            if deadlines:
                for out in outputs:
                    if out.finish_reason is not None:
                        deadlines.discard(out.request_id)
            emit("outputs", outputs, engine.last_stats, time.monotonic() - t0, _snapshot(engine))
    except Exception as exc:
        log.exception("engine loop died")
        emit("dead", type(exc).__name__)


class Core(ABC):
    """What the asyncio side needs from an engine: request checks (no model needed), commands, events."""

    tokenizer: Any
    model_name: str
    max_model_len: int

    @abstractmethod
    def resolve_params(self, params: SamplingParams) -> SamplingParams: ...

    @abstractmethod
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None: ...

    @abstractmethod
    def start(self, emit: Emit) -> None:
        """Start the loop; `emit(name, *args)` is called from a non-event-loop thread for every event."""

    @abstractmethod
    def send(self, cmd: Command) -> None:
        """Queue a command (non-blocking, callable from the event loop)."""

    @abstractmethod
    def stop(self, timeout: float) -> None:
        """Stop the loop and wait up to `timeout` seconds."""


class ThreadCore(Core):
    """The Engine in a daemon thread of this process; commands through a SimpleQueue."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def tokenizer(self) -> Any:  # type: ignore[override]
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:  # type: ignore[override]
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:  # type: ignore[override]
        return self.engine.max_model_len

    def resolve_params(self, params: SamplingParams) -> SamplingParams:
        return self.engine.resolve_params(params)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.check_request(prompt_token_ids, params)

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
