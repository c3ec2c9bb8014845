"""One load-generator run against a server (:func:`bench`), the figures the tables keep of it, the medians rounds
are folded with, and the suite's log line."""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loadtest.config import BenchmarkConfig
from loadtest.runner import run_benchmark

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


def log(msg: str) -> None:
    print(f"[suite {datetime.now(timezone.utc).strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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
    temperature: float = 0.0,
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
        temperature=temperature,
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
        if mode in ("self_spec", "auto") and spec.get("num_drafts"):  # auto: its self_spec rounds
            out["acceptance_length"] = spec.get("acceptance_length")
            out["acceptance_rate"] = spec.get("acceptance_rate")
    out["errors"] = list(result.get("errors") or [])[:3]
    return out


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median output throughput (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r["output_throughput"])[(len(runs) - 1) // 2]


def median(values: list[float]) -> float:
    data = sorted(values)
    mid = len(data) // 2
    return data[mid] if len(data) % 2 else (data[mid - 1] + data[mid]) / 2
