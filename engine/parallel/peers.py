"""Peers: rank 0's side of tensor parallelism. Starts ranks 1..N-1, sends each of them every forward, watches them.

Each worker is a `python -m engine.parallel.worker` subprocess (not a multiprocessing child: the engine may itself
run in a daemonic process, which multiprocessing forbids to have children) with two pipes: commands down (its
`WorkerSpec`, then one pickled `ForwardPlan` per forward, `PROBE`, or None to stop) and errors up (why it could
not load or run). The scheduler's batch travels down the pipes; the activations travel through the collectives.

Failure: before each forward the workers' liveness is checked (a process that exited fails the forward at once),
and a worker that dies during one fails the collective rank 0 waits in (gloo: at once, the peer's sockets close;
any backend: within `tensor_parallel_timeout`). Either way `failure()` builds a `TensorParallelError` that names
the rank, its exit code and its own error message, and stops the other workers: the engine dies cleanly and the
server's respawn starts a new one. A worker whose rank 0 is gone sees its command pipe close (or its collective
fail) and exits.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.parallel.group import TensorParallelError, TensorParallelGroup, make_store

log = logging.getLogger("trimode.engine")

STORE_HOST = "127.0.0.1"  # the ranks of one engine share a host
_EXIT_WAIT_S = 5.0  # how long a worker whose collective broke is given to finish exiting (for its exit code)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to become rank `rank`: sent as the first message on its command pipe."""

    config: EngineConfig
    model_path: str
    rank: int
    world: int
    store_port: int
    log_level: int


class Peers:
    """Ranks 1..N-1 of this engine, and rank 0's membership of their group (`group`)."""

    def __init__(self, config: EngineConfig, model_path: str, device: torch.device) -> None:
        world = config.tensor_parallel_size
        timeout = config.tensor_parallel_timeout
        store = make_store(STORE_HOST, 0, world, True, timeout)
        self._procs: list[subprocess.Popen] = []
        self._commands: list[Connection] = []
        self._errors: list[Connection] = []
        self._closed = False
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the workers import this very `engine` package
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        level = logging.getLogger("trimode.engine").getEffectiveLevel()
        if device.type == "cuda":  # untested here (no GPU): NCCL needs each rank's device current
            torch.cuda.set_device(device)
        try:
            for rank in range(1, world):
                cmd_r, cmd_w = os.pipe()
                err_r, err_w = os.pipe()
                proc = subprocess.Popen([sys.executable, "-m", "engine.parallel.worker", str(cmd_r), str(err_w)],
                                        pass_fds=(cmd_r, err_w), env=env)
                os.close(cmd_r)
                os.close(err_w)
                self._procs.append(proc)
                self._commands.append(Connection(cmd_w, readable=False))
                self._errors.append(Connection(err_r, writable=False))
                self._commands[-1].send(WorkerSpec(config, model_path, rank, world, store.port, level))
                log.info("tensor-parallel worker rank %d of %d: pid %d", rank, world, proc.pid)
            # blocks until every rank has joined (bounded by the timeout)
            self.group = TensorParallelGroup(store, 0, world, device, timeout)
        except BaseException as exc:
            raise self.failure(exc, loading=True) from exc
        self._store = store  # rank 0 hosts it: it lives as long as the group

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def send(self, plan: object) -> None:
        """Hand every worker the next forward (or `PROBE`); TensorParallelError when one is gone."""
        self._check_alive()
        data = bytes(ForkingPickler.dumps(plan))  # pickled once for every rank
        for conn in self._commands:
            conn.send_bytes(data)

    def watch(self, on_lost: Callable[[str], None]) -> None:
        """Call `on_lost(reason)` from a daemon thread as soon as a worker exits unasked, even while the engine is
        idle (its error pipe closes: no polling). The engine process passes one that ends the process, so that
        the server sees its engine die (/health 503, open streams fail, respawn) without waiting for a forward."""
        def run() -> None:
            try:
                wait(self._errors)
            except (OSError, ValueError):  # closed by `close()`
                return
            if not self._closed:
                deadline = time.monotonic() + _EXIT_WAIT_S
                for proc in self._procs:  # its pipe closed as it exited: wait for the exit code
                    try:
                        proc.wait(max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
                dead = [f"rank {r} (pid {p.pid}, exit code {p.returncode})"
                        for r, p in enumerate(self._procs, start=1) if p.returncode is not None]
                on_lost("tensor-parallel worker exited: " + (", ".join(dead) or "a rank closed its pipe"))

        threading.Thread(target=run, name="trimode-tp-watch", daemon=True).start()

    def _check_alive(self) -> None:
        if self._closed:
            raise TensorParallelError("the tensor-parallel workers were stopped")
        for proc in self._procs:
            if proc.poll() is not None:
                raise self.failure(None)

    def failure(self, cause: BaseException | None, loading: bool = False) -> BaseException:
        """The error to raise after a forward (or, `loading`, the startup) on the ranks failed with `cause`, and
        the workers are stopped. A forward's failure is always a TensorParallelError naming the rank that broke
        it, its exit code and its own message; at startup a load error keeps its type (a bad checkpoint is a
        ValueError on whichever rank read it)."""
        if isinstance(cause, RuntimeError):  # a broken collective: the peer that broke it is exiting
            deadline = time.monotonic() + _EXIT_WAIT_S
            for proc in self._procs:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        reasons: list[str] = []
        reported: BaseException | None = None
        for rank, (proc, errors) in enumerate(zip(self._procs, self._errors), start=1):
            message = None
            try:
                if errors.poll(0):
                    kind, message = errors.recv()
                    if kind in ("ValueError", "FileNotFoundError") and reported is None:
                        reported = (ValueError if kind == "ValueError" else FileNotFoundError)(message)
                    message = f"{kind}: {message}"
            except (EOFError, OSError):
                pass
            code = proc.poll()
            if code is not None or message is not None:
                reasons.append(f"tensor-parallel rank {rank} (pid {proc.pid}) "
                               + (f"exited (exit code {code})" if code is not None else "failed")
                               + (f": {message}" if message else ""))
        self.close()
        if loading and reported is not None:
            return reported
        if loading and not reasons and isinstance(cause, (ValueError, FileNotFoundError)):
            return cause
        if not reasons:
            reasons.append(f"rank 0 failed: {type(cause).__name__}: {cause}")
        return TensorParallelError("; ".join(reasons))

    def close(self, timeout: float = 10.0) -> None:
        """Stop every worker: None down its pipe, SIGKILL if it has not exited within `timeout`."""
        if self._closed:
            return
        self._closed = True
        for conn in self._commands:
            try:
                conn.send_bytes(bytes(ForkingPickler.dumps(None)))
            except OSError:
                pass
            conn.close()
        for proc in self._procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self._errors:
            conn.close()
