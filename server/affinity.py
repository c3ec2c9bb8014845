"""CPU placement of `trimode serve`'s two processes: the engine's compute on its own cores, HTTP on the rest.

Why: on a CPU engine the forward is the bottleneck, and the HTTP process wakes for every engine step (the pipe,
SSE framing, detokenizing). Left to the kernel, the woken HTTP thread and a co-located load generator keep landing
on the engine's core and stall its forward. On the 2-vCPU CI machine, re-pinning one running server between
alternating load runs (trimode-tiny, `ar`, concurrency 8) moved it from 1181 / 1207 / 1513 to 1490 / 1660 / 1581
output tok/s (docs/perf-serving.md, run 8). vLLM's CPU backend does the same: `VLLM_CPU_OMP_THREADS_BIND` binds
the engine's threads and keeps cores free for the frontend.

`[server] engine_cpus`:
- `"auto"` (default): on a CPU engine with at least two usable CPUs, the engine gets the last `num_threads` of them
  (all but one when `num_threads` is unset) and the HTTP process the others; nothing is pinned when that would
  leave no CPU for HTTP, on CUDA, or where the OS has no `sched_setaffinity`;
- a Linux cpu list such as `"1-3,6"`: exactly those CPUs for the engine (a subset of the usable ones), the rest for
  HTTP; the engine's torch threads default to their count;
- `"none"` (or None): no pinning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuPlan:
    engine: tuple[int, ...]  # CPUs of the engine process
    api: tuple[int, ...]  # CPUs of the HTTP process (empty: leave it unpinned)

    def describe(self) -> str:
        return f"engine on CPUs {format_cpu_list(self.engine)}, HTTP on " + (
            format_cpu_list(self.api) if self.api else "any CPU")


def parse_cpu_list(text: str, field: str = "engine_cpus") -> tuple[int, ...]:
    """`"0-2,5"` -> (0, 1, 2, 5); ValueError naming `field` on anything else."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"server config: invalid {field}={text!r}: expected 'auto', 'none' or a CPU list such as "
                             f"'1-3,6'")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"server config: invalid {field}={text!r}: range {part!r} runs backwards")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def format_cpu_list(cpus: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cpus)


def usable_cpus() -> tuple[int, ...] | None:
    """The CPUs this process may run on; None where the OS cannot pin (not Linux)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return tuple(sorted(os.sched_getaffinity(0)))


def plan_cpus(spec: str | None, engine_on_cpu: bool, num_threads: int | None,
              available: tuple[int, ...] | None) -> CpuPlan | None:
    """Where the engine and HTTP processes run, or None for no pinning. ValueError names `engine_cpus`."""
    if spec is None or spec == "none":
        return None
    if spec != "auto":
        engine = parse_cpu_list(spec)
        if available is None:
            raise ValueError(f"server config: engine_cpus={spec!r} but this OS cannot pin processes to CPUs")
        outside = sorted(set(engine) - set(available))
        if outside:
            raise ValueError(f"server config: engine_cpus={spec!r} names CPU(s) {format_cpu_list(tuple(outside))} "
                             f"outside the usable ones ({format_cpu_list(available)})")
        return CpuPlan(engine, tuple(c for c in available if c not in engine))
    if not engine_on_cpu or available is None or len(available) < 2:
        return None
    k = len(available) - 1 if num_threads is None else num_threads
    if k > len(available) - 1:  # the engine wants every CPU: pinning would only squeeze it
        return None
    return CpuPlan(available[-k:], available[:-k])


def pin_current_process(cpus: tuple[int, ...]) -> None:
    """Pin this process (threads started from now on inherit it)."""
    os.sched_setaffinity(0, cpus)
