"""The engine loop apart from how it is reached: commands in, events out, over a thread or a process.

`run_engine_loop` drains the commands (Add | Abort | Probe | Stop) before every step, blocks on them only while
the engine is idle, runs one `Engine.step()` and emits one event per step. Events are plain picklable tuples
`(name, *args)`:

- `("outputs", outputs, stats, step_seconds, snapshot)` once per step (and once when the engine goes idle);
- `("fail_request", request_id, message)` when an Add is refused (a ValueError from the engine);
- `("fail_requests", request_ids, message, snapshot)` when one forward failed (an exception carrying
  `request_ids`): those requests are aborted and the loop goes on;
- `("probe", probe_id, error_or_None)` after a readiness probe forward;
- `("dead", reason)` when anything else escapes: the loop ends.

Two transports implement `Core`: `ThreadCore` (the Engine in a thread of the server process) and
`server.engine_process.EngineProcess` (the Engine in its own process, so its Python never shares a GIL with the
event loop). The asyncio side (`server.async_engine`) only ever sees `Core`.
"""

from __future__ import annotations

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


@dataclass(slots=True)
class Abort:
    request_id: str


@dataclass(slots=True)
class Probe:
    probe_id: int


@dataclass(slots=True)
class Stop:
    pass


Command = Add | Abort | Probe | Stop
Emit = Callable[..., None]  # emit(event_name, *args)
GetCommand = Callable[[bool], "Command | None"]  # get(block): the next command; None when not blocking and none


@dataclass(slots=True)
class Snapshot:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0


def _snapshot(engine: Any) -> Snapshot:
    return Snapshot(engine.num_running, engine.num_waiting, float(engine.kv_cache_usage))


def _apply(engine: Any, cmd: Command, emit: Emit) -> bool:
    """Apply one command; False means stop."""
    if isinstance(cmd, Add):
        try:
            engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params, arrival_time=cmd.arrival_time)
        except ValueError as exc:
            emit("fail_request", cmd.request_id, str(exc))
    elif isinstance(cmd, Abort):
        engine.abort_request(cmd.request_id)
    elif isinstance(cmd, Probe):
        try:
            engine.probe()
            emit("probe", cmd.probe_id, None)
        except Exception as exc:  # a broken forward fails readiness, not the engine
            emit("probe", cmd.probe_id, f"{type(exc).__name__}: {exc}")
    elif isinstance(cmd, Stop):
        return False
    return True


def run_engine_loop(engine: Any, get: GetCommand, emit: Emit) -> None:
    """Serve commands and step the engine until Stop; an unexpected exception emits "dead" and returns."""
    try:
        while True:
            if not engine.has_unfinished():
                emit("outputs", [], None, 0.0, _snapshot(engine))
                cmd = get(True)
                if cmd is None or not _apply(engine, cmd, emit):
                    return
            while (cmd := get(False)) is not None:
                if not _apply(engine, cmd, emit):
                    return
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
                emit("fail_requests", list(failed), str(exc), _snapshot(engine))
                continue
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

    def _get(self, block: bool) -> Command | None:
        if block:
            return self._inbox.get()
        try:
            return self._inbox.get_nowait()
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
