"""Part 1, ``overhead``: the server against the offline engine at one concurrency, the same prompts token for token,
offline and server runs alternating; the figure is the best server tok/s over the best offline tok/s."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from loadtest.suite.machine import cpu_plan, placed, process_cpu_seconds
from loadtest.suite.measure import bench, log, median, summarize
from loadtest.suite.settings import Settings, prompts_desc

OVERHEAD_TARGET = 0.90


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
