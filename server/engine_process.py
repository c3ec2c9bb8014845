"""EngineProcess: the Engine in its own process, reached over two pipes; the server's default `EngineTransport`.

Why a process: on a small model the engine's step is mostly Python (scheduling, sampling, bookkeeping), and in a
thread it shares one GIL with the event loop's per-token work (SSE framing, detokenizing, metrics), so each
waits for the other. In its own process the engine steps while the event loop serves: the same design as
vLLM v1's EngineCore process.

Wire: commands (`engine.commands` Add | Abort | Probe | Stop) go down one pipe, written by a sender thread so
that the event loop never blocks on a full pipe; events (`engine.events` Outputs, ...) come back up the other,
read by a reader thread that hands each one to `emit`. The child is started with `spawn` (no forked torch or CUDA
state), loads the model, answers `Ready(policy, model_path)` or `LoadFailed(exception type, message)`, then runs
`run_engine_loop`. The parent loads only the tokenizer and validates requests with the shipped policy.

Lifetime: the child starts its own session, so a signal sent to the server's process group (Ctrl-C in a
terminal, `kill -TERM -PGID`) reaches only the server, which drains and then stops the child with Stop (SIGKILL
after a timeout). If the server process dies, the child sees its command pipe close and exits. If the child
dies, the reader sees the event pipe close and emits `Dead`, so every open request fails and /health says 503;
the server then calls `respawn` (with backoff, `server.async_engine`), which starts a fresh child with fresh
pipes: commands sent to the dead one are dropped, and the new one is clean.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from engine.commands import Command, Stop
from engine.config import EngineConfig
from engine.events import Dead, Emit, Event
from engine.loop import run_engine_loop
from engine.policy import RequestPolicy

log = logging.getLogger("trimode.server")

_LOAD_ERRORS: dict[str, type[Exception]] = {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError}


@dataclass(slots=True)
class Ready:
    """The child loaded its model: what the server checks requests with, and the model's path (its tokenizer)."""

    policy: RequestPolicy
    model_path: str


@dataclass(slots=True)
class LoadFailed:
    """The child could not load its model: the exception's type name and message, raised again in the server."""

    kind: str
    message: str


def _child_main(config: EngineConfig, log_level: str, commands: Connection, events: Connection,
                cpus: tuple[int, ...] | None = None) -> None:
    """The engine process: load, report, serve commands until Stop or until the server goes away."""
    if cpus:
        os.sched_setaffinity(0, cpus)  # before the model loads: its threads and allocations start here
    if hasattr(os, "setsid"):
        os.setsid()  # out of the server's process group: group signals are the server's to handle
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s [engine] %(message)s")

    def emit(event: Event | Ready | LoadFailed) -> None:
        try:
            events.send(event)
        except OSError:  # the server process is gone
            raise SystemExit(0) from None

    try:
        from engine.engine import Engine, default_model_path

        engine = Engine(config)
        engine.exit_when_a_worker_dies()  # a dead tensor-parallel rank ends this process: the server sees it die
        path = config.model or default_model_path()
    except Exception as exc:  # reported to the parent, which raises it at startup
        emit(LoadFailed(type(exc).__name__, str(exc)))
        return
    emit(Ready(engine.policy, path))

    def get(block: bool, timeout: float | None = None) -> Command | None:
        try:
            # poll(None) waits without limit; poll(timeout) lets the loop wake for the nearest request deadline
            if commands.poll(timeout if block else 0):
                return commands.recv()
        except (EOFError, OSError):
            return Stop()  # the server process is gone
        return None

    run_engine_loop(engine, get, emit)


class EngineProcess:
    """Spawn the engine process and wait until its model is loaded; raises what loading raised. An
    `EngineTransport` that can respawn.

    `cpus` pins the engine process to those CPUs (`server.affinity`); its torch threads then default to their count.
    """

    can_respawn = True

    def __init__(self, config: EngineConfig, log_level: str = "info", startup_timeout: float = 600.0,
                 cpus: tuple[int, ...] | None = None) -> None:
        if cpus and config.num_threads is None:
            config = replace(config, num_threads=len(cpus))
        self._spawn_args = (config, log_level, cpus)
        self._startup_timeout = startup_timeout
        self._threads: list[threading.Thread] = []
        self._stopping = False
        path = self._spawn()
        from engine.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(path)
        self.model_name = self.policy.model_name
        self.max_model_len = self.policy.max_model_len

    def _spawn(self) -> str:
        """Start a child on fresh pipes and wait until its model is loaded; returns the model path."""
        config, log_level, cpus = self._spawn_args
        ctx = mp.get_context("spawn")
        child_commands, self._commands = ctx.Pipe(duplex=False)
        self._events, child_events = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_child_main, args=(config, log_level, child_commands, child_events, cpus),
                                name="trimode-engine", daemon=True)
        self.proc.start()
        child_commands.close()
        child_events.close()
        self._outbox: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        try:
            self.policy, path = self._wait_ready(self._startup_timeout)
        except BaseException:
            self._kill()
            self._commands.close()
            self._events.close()
            raise
        log.info("engine process %d ready (%s)", self.proc.pid, self.policy.model_name)
        return path

    def respawn(self) -> None:
        """Replace a dead child with a fresh one (blocking while the model loads); raises what loading raised.

        Call `start` afterwards. What the old child held is gone; commands queued for it are dropped."""
        if self._stopping:
            raise RuntimeError("the engine process is stopping")
        self._outbox.put(None)  # the old writer ends (if it has not already, on the closed pipe)
        self._kill()  # a child whose loop died may still be exiting
        for t in self._threads:  # the reader saw EOF when the child died, and reported it
            t.join(5)
        self._threads = []
        self._commands.close()
        self._events.close()
        self._spawn()
        if self._stopping:  # stop() ran while the model loaded and may have missed this child
            self._kill()
            raise RuntimeError("the engine process was stopped while respawning")

    def _wait_ready(self, timeout: float) -> tuple[RequestPolicy, str]:
        deadline = time.monotonic() + timeout
        while not self._events.poll(0.2):
            if self._stopping:  # stop() during a respawn: the server is going away, the model need not load
                raise RuntimeError("the engine process was stopped while loading")
            if not self.proc.is_alive():
                raise RuntimeError(f"the engine process exited while loading (exit code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine process did not load the model within {timeout:.0f}s")
        try:
            msg = self._events.recv()
        except EOFError:
            raise RuntimeError("the engine process exited while loading") from None
        if isinstance(msg, LoadFailed):
            kind, text = msg.kind, msg.message
            raise _LOAD_ERRORS.get(kind, RuntimeError)(text if kind in _LOAD_ERRORS else f"{kind}: {text}")
        assert isinstance(msg, Ready), msg
        return msg.policy, msg.model_path

    # ---- the loop ---------------------------------------------------------------------------------------------
    def start(self, emit: Emit) -> None:
        # each thread keeps the child and the pipes it started with: after a respawn they are another child's
        self._threads = [threading.Thread(target=self._read, args=(emit, self.proc, self._events),
                                          name="trimode-engine-events", daemon=True),
                         threading.Thread(target=self._write, args=(self._outbox, self._commands),
                                          name="trimode-engine-commands", daemon=True)]
        for t in self._threads:
            t.start()

    def send(self, cmd: Command) -> None:
        self._outbox.put(cmd)

    @staticmethod
    def _write(outbox: queue.SimpleQueue[Command | None], commands: Connection) -> None:
        while (cmd := outbox.get()) is not None:
            try:
                commands.send(cmd)
            except OSError:
                return  # the child is gone; the reader reports it

    def _read(self, emit: Emit, proc: Any, events: Connection) -> None:
        while True:
            try:
                event = events.recv()
            except (EOFError, OSError):
                break
            emit(event)
        if not self._stopping:
            proc.join(5)
            log.error("the engine process exited (exit code %s)", proc.exitcode)
            emit(Dead(f"the engine process exited (exit code {proc.exitcode})"))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child (Stop, then SIGKILL after `timeout`) and the two threads."""
        self._stopping = True
        self._outbox.put(Stop())
        self._outbox.put(None)
        self.proc.join(timeout)
        self._kill()
        for t in self._threads:  # the child's exit closed the event pipe: the reader has seen EOF
            t.join(timeout)
        self._commands.close()
        self._events.close()

    def _kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
