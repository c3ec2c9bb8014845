"""Client-side statistics: per-request TTFT / TPOT / ITL / E2EL, throughputs, peaks and per-mode figures.

Definitions follow ``vllm bench serve`` (see loadtest/README.md). Times in the inputs are seconds; the
summary figures ``*_ms`` are milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from loadtest.client import RequestOutput

JSON_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    data = sorted(values)
    rank = (len(data) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (rank - lo)


def percentile_key(p: float) -> str:
    """``99.0`` -> ``"99"``, ``99.9`` -> ``"99.9"`` (vLLM's naming of percentile fields and rows)."""
    return str(int(p)) if int(p) == p else str(p)


def summarize_ms(values_s: Sequence[float], name: str, percentiles: Iterable[float]) -> dict[str, float]:
    """mean / median / std / p<p> of ``values_s`` (seconds) as ``{stat}_{name}_ms`` in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    n = len(ms)
    mean = sum(ms) / n if n else 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / n) if n else 0.0  # population std, as numpy
    out = {f"mean_{name}_ms": mean, f"median_{name}_ms": percentile(ms, 50.0), f"std_{name}_ms": std}
    for p in sorted(set(JSON_PERCENTILES) | set(percentiles)):
        out[f"p{percentile_key(p)}_{name}_ms"] = percentile(ms, p)
    return out


def tpot_of(out: RequestOutput) -> float | None:
    """(E2EL - TTFT) / (output_tokens - 1) for outputs longer than one token, else None."""
    if out.output_tokens > 1:
        return (out.latency - out.ttft) / (out.output_tokens - 1)
    return None


def peak_output_tokens_per_s(outputs: Sequence[RequestOutput], t0: float) -> float:
    """Max tokens produced within one 1-s bucket (from t0). A chunk's tokens are output_tokens / chunks."""
    buckets: dict[int, float] = {}
    for out in outputs:
        if not out.chunk_times:
            continue
        per_chunk = out.output_tokens / out.num_chunks
        for t in out.chunk_times:
            key = int(t - t0)
            buckets[key] = buckets.get(key, 0.0) + per_chunk
    return max(buckets.values(), default=0.0)


def peak_concurrency(outputs: Sequence[RequestOutput]) -> int:
    """Max number of requests in flight at the same instant (send -> last byte), failures included."""
    events = [(o.start_time, 1) for o in outputs] + [(o.start_time + o.latency, -1) for o in outputs]
    events.sort(key=lambda e: (e[0], e[1]))  # ends before starts at the same instant
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def mean_or_none(values: Sequence[float]) -> float | None:
    """Arithmetic mean, None when empty."""
    return sum(values) / len(values) if values else None


def per_mode_stats(outputs: Sequence[RequestOutput], duration: float) -> dict[str, dict[str, Any]]:
    """Per served mode: request counts, output tok/s (over the whole run) and mean latencies in ms."""
    modes = sorted({o.served_mode for o in outputs})
    table: dict[str, dict[str, Any]] = {}
    for mode in modes:
        mine = [o for o in outputs if o.served_mode == mode]
        ok = [o for o in mine if o.success]
        tokens = sum(o.output_tokens for o in ok)
        chunks = sum(o.num_chunks for o in ok)
        tpots = [t for t in (tpot_of(o) for o in ok) if t is not None]
        itls = [g for o in ok for g in o.itl]
        ms = lambda v: None if v is None else v * 1000.0  # noqa: E731
        table[mode] = {
            "completed": len(ok),
            "failed": len(mine) - len(ok),
            "total_output_tokens": tokens,
            "output_throughput": tokens / duration if duration > 0 else 0.0,
            "mean_ttft_ms": ms(mean_or_none([o.ttft for o in ok])),
            "mean_tpot_ms": ms(mean_or_none(tpots)),
            "mean_itl_ms": ms(mean_or_none(itls)),
            "mean_e2el_ms": ms(mean_or_none([o.latency for o in ok])),
            "mean_tokens_per_chunk": tokens / chunks if chunks else None,
        }
    return table


def compute_metrics(
    outputs: Sequence[RequestOutput], duration: float, percentiles: Iterable[float] = ()
) -> dict[str, Any]:
    """All client-side figures of one run (the JSON result minus config and server metrics)."""
    percentiles = list(percentiles)
    ok = [o for o in outputs if o.success]
    total_in = sum(o.prompt_tokens for o in ok)
    total_out = sum(o.output_tokens for o in ok)
    chunks = sum(o.num_chunks for o in ok)
    tpots = [t for t in (tpot_of(o) for o in ok) if t is not None]
    itls_flat = [g for o in ok for g in o.itl]
    t0 = min((o.start_time for o in outputs), default=0.0)
    result: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
        "max_output_tokens_per_s": peak_output_tokens_per_s(ok, t0),
        "max_concurrent_requests": peak_concurrency(outputs),
        "total_chunks": chunks,
        "mean_tokens_per_chunk": total_out / chunks if chunks else None,
        # usage.prompt_tokens_details.cached_tokens summed (None when the server reports none)
        "total_cached_tokens": sum(o.cached_tokens for o in ok if o.cached_tokens is not None)
        if any(o.cached_tokens is not None for o in ok) else None,
    }
    result.update(summarize_ms([o.ttft for o in ok], "ttft", percentiles))
    result.update(summarize_ms(tpots, "tpot", percentiles))
    result.update(summarize_ms(itls_flat, "itl", percentiles))
    result.update(summarize_ms([o.latency for o in ok], "e2el", percentiles))
    result["per_mode"] = per_mode_stats(outputs, duration)
    result["input_lens"] = [o.prompt_tokens for o in ok]
    result["output_lens"] = [o.output_tokens for o in ok]
    result["ttfts"] = [o.ttft for o in ok]
    result["itls"] = [o.itl for o in ok]
    result["latencies"] = [o.latency for o in ok]
    result["modes"] = [o.served_mode for o in ok]
    return result
