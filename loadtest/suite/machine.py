"""The machine under the suite: its description (``lscpu``, memory, library versions), the load average sampled
while the parts run, CPU seconds of a process tree read from /proc, and the CPU placement the suite shares with its
trimode servers."""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loadtest.suite.settings import Settings
from server.affinity import CpuPlan, plan_cpus, usable_cpus

START_CPUS = usable_cpus()  # the CPUs this run started with (None where the OS cannot pin)


def cpu_plan(s: Settings) -> CpuPlan | None:
    """The placement the trimode servers of this run use (their `engine_cpus`, decided on the CPUs this run
    started with); the suite puts its load generator on the HTTP CPUs and part 1's offline engine on the engine's."""
    spec = None if s.engine_cpus == "none" else s.engine_cpus
    return plan_cpus(spec, True, s.threads, START_CPUS)


@contextmanager
def placed(cpus: tuple[int, ...] | None) -> Iterator[None]:
    """Run this process on ``cpus`` inside the block (no-op for None or empty); the previous mask comes back."""
    if not cpus or START_CPUS is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def machine_info(threads: int | None) -> dict[str, Any]:
    """CPU (``lscpu`` head), cores, memory, load, library versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "loadavg": list(os.getloadavg()),
    }
    try:
        info["lscpu"] = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()[:20]
    except (OSError, subprocess.SubprocessError):
        info["lscpu"] = []
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()
        info["meminfo"] = [line for line in mem if line.split(":")[0] in ("MemTotal", "MemAvailable")]
    except OSError:
        pass
    for mod in ("torch", "transformers"):
        try:
            info[f"{mod}_version"] = __import__(mod).__version__
        except ImportError:
            info[f"{mod}_version"] = None
    return info


class LoadSampler:
    """Samples the 1-minute load average every few seconds in a daemon thread (the machine may be shared)."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), os.getloadavg()[0]))
            self._stop.wait(self.every)

    def start(self) -> LoadSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def window(self, t0: float, t1: float) -> dict[str, float | int | None]:
        vals = [v for t, v in self.samples if t0 <= t <= t1]
        if not vals:
            return {"samples": 0, "mean": None, "max": None}
        return {"samples": len(vals), "mean": round(sum(vals) / len(vals), 2), "max": round(max(vals), 2)}


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (field 3, the state, is index 0)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU seconds of ``pid`` and its live descendants (the engine process of ``trimode serve``,
    all threads) from /proc; this process alone when None."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int(_stat(int(entry.name))[1])
                except (OSError, IndexError, ValueError):
                    continue
        tree, frontier = {pid}, [pid]
        while frontier:
            kids = [p for p, ppid in parents.items() if ppid in frontier and p not in tree]
            tree.update(kids)
            frontier = kids
        total = 0.0
        for p in tree:
            fields = _stat(p)
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total
    except (OSError, IndexError, ValueError):
        return None
