"""Server subprocesses: ``trimode serve`` and ``transformers serve`` on free loopback ports, each with its log in a
file, started with a readiness poll and always stopped (SIGTERM to the process group, then SIGKILL)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from loadtest.suite.machine import START_CPUS, placed

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def thread_env(threads: int | None) -> dict[str, str]:
    """The environment of a server subprocess: this one, offline hub, and the torch thread count."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    """A server subprocess with its log in a file; ``start`` waits for ``GET ready_path`` == 200."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        port: int,
        log_path: Path,
        env: dict[str, str] | None = None,
        ready_path: str = "/v1/models",
    ) -> None:
        self.name, self.cmd, self.port, self.log_path, self.env = name, cmd, port, log_path, env
        self.ready_path = ready_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{port}"

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def start(self, timeout: float) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        log.write(("$ " + shlex.join(self.cmd) + "\n").encode())
        log.flush()
        self._log = log
        with placed(START_CPUS):  # the child inherits the mask: give it every CPU, it places itself
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=str(REPO),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with status {self.proc.returncode} before it was "
                    f"ready; log tail:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + self.ready_path, timeout=5.0, trust_env=False).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(f"{self.name} not ready after {timeout:.0f} s; log tail:\n{self.log_tail()}")
            time.sleep(0.5)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL (the process group: uvicorn workers, threads)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


@contextmanager
def running(server: ServerProcess, timeout: float) -> Iterator[str]:
    """Start ``server``, yield its URL, always stop it."""
    try:
        yield server.start(timeout)
    finally:
        server.stop()


def _listen(port: int) -> list[str]:
    """The flags both servers take alike: loopback, the port, quiet logs."""
    return ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]


def trimode_server(model: str, log_dir: Path, threads: int | None, name: str = "trimode",
                   dtype: str = "float32", engine_cpus: str = "auto") -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "server", "serve", "--model", model, *_listen(port), "--shutdown-timeout", "5",
           "--engine.device", "cpu", "--engine.dtype", dtype, "--server.engine_cpus", engine_cpus]
    if threads:
        cmd += ["--engine.num_threads", str(threads)]
    return ServerProcess(name, cmd, port, log_dir / f"{name}.log", thread_env(threads))


def transformers_server(model_dir: str, log_dir: Path, threads: int | None, exe: str | None,
                        dtype: str = "float32") -> ServerProcess:
    port = free_port()
    exe = exe or shutil.which("transformers") or "transformers"
    cmd = [exe, "serve", "--continuous-batching", "--dtype", dtype, "--device", "cpu", *_listen(port), model_dir]
    return ServerProcess(
        "transformers-serve", cmd, port, log_dir / "transformers-serve.log", thread_env(threads), ready_path="/health"
    )
