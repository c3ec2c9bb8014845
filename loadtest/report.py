"""Console report in ``vllm bench serve``'s layout, and the JSON result file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from loadtest.config import display_percentiles
from loadtest.metrics import percentile_key

WIDTH = 50
LABEL_WIDTH = 40


def title(text: str, fill: str = "=") -> str:
    """``text`` centred in 50 columns between ``fill`` characters."""
    return "{s:{c}^{n}}".format(s=text, c=fill, n=WIDTH)


def row(label: str, value: Any) -> str:
    """Label padded to 40 columns, then the value (floats with two decimals, None as n/a)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{label:<{LABEL_WIDTH}} {'n/a':<10}"
    if isinstance(value, float):
        return f"{label:<{LABEL_WIDTH}} {value:<10.2f}"
    return f"{label:<{LABEL_WIDTH}} {value!s:<10}"


def _count(value: float | None) -> int | float | None:
    """Counters arrive as floats; show whole numbers as ints."""
    if value is not None and float(value).is_integer():
        return int(value)
    return value


def _fmt(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.2f}{unit}"


def _latency_section(
    result: dict[str, Any], key: str, name: str, header: str, pcts: list[float]
) -> list[str]:
    lines = [title(header, "-")]
    lines.append(row(f"Mean {name} (ms):", result.get(f"mean_{key}_ms")))
    lines.append(row(f"Median {name} (ms):", result.get(f"median_{key}_ms")))
    for p in pcts:
        word = percentile_key(p)
        lines.append(row(f"P{word} {name} (ms):", result.get(f"p{word}_{key}_ms")))
    return lines


def format_report(result: dict[str, Any]) -> str:
    """The console block for a result dict from :func:`loadtest.run_benchmark`."""
    cfg = result.get("config", {})
    pcts = display_percentiles(str(cfg.get("metric_percentiles") or "99"))
    rate = cfg.get("request_rate", "inf")
    lines = [title(" Serving Benchmark Result ")]
    lines.append(row("Successful requests:", result["completed"]))
    lines.append(row("Failed requests:", result["failed"]))
    if cfg.get("max_concurrency") is not None:
        lines.append(row("Maximum request concurrency:", cfg["max_concurrency"]))
    if rate != "inf" and not math.isinf(float(rate)):
        lines.append(row("Request rate configured (RPS):", float(rate)))
    lines.append(row("Benchmark duration (s):", result["duration"]))
    lines.append(row("Total input tokens:", result["total_input_tokens"]))
    lines.append(row("Total generated tokens:", result["total_output_tokens"]))
    lines.append(row("Request throughput (req/s):", result["request_throughput"]))
    lines.append(row("Output token throughput (tok/s):", result["output_throughput"]))
    lines.append(row("Peak output token throughput (tok/s):", float(result["max_output_tokens_per_s"])))
    lines.append(row("Peak concurrent requests:", float(result["max_concurrent_requests"])))
    lines.append(row("Total token throughput (tok/s):", result["total_token_throughput"]))
    lines += _latency_section(result, "ttft", "TTFT", "Time to First Token", pcts)
    lines += _latency_section(result, "tpot", "TPOT", "Time per Output Token (excl. 1st token)", pcts)
    lines += _latency_section(result, "itl", "ITL", "Inter-token Latency", pcts)
    lines.append(row("Mean tokens per chunk:", result.get("mean_tokens_per_chunk")))
    lines += _latency_section(result, "e2el", "E2EL", "End-to-end Latency", pcts)
    lines += _per_mode_section(result)
    lines += _spec_decode_section(result.get("spec_decode") or {})
    lines += _prefix_cache_section(result)
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def _per_mode_section(result: dict[str, Any]) -> list[str]:
    per_mode: dict[str, dict[str, Any]] = result.get("per_mode") or {}
    tpf: dict[str, float | None] = result.get("tokens_per_forward") or {}
    lines = [title("Per-mode", "-")]
    for mode in sorted(per_mode):
        m = per_mode[mode]
        value = (
            f"{m['completed']} req, {m['output_throughput']:.2f} tok/s, "
            f"TTFT {_fmt(m.get('mean_ttft_ms'), ' ms')}, TPOT {_fmt(m.get('mean_tpot_ms'), ' ms')}"
        )
        lines.append(row(f"{mode}:", value))
    for mode in sorted(set(per_mode) | set(tpf)):
        lines.append(row(f"Tokens per forward ({mode}):", tpf.get(mode)))
    return lines


def _spec_decode_section(spec: dict[str, Any]) -> list[str]:
    return [
        title("Speculative Decoding", "-"),
        row("Acceptance rate (%):", spec.get("acceptance_rate")),
        row("Acceptance length:", spec.get("acceptance_length")),
        row("Drafts:", _count(spec.get("num_drafts"))),
        row("Draft tokens:", _count(spec.get("num_draft_tokens"))),
        row("Accepted tokens:", _count(spec.get("num_accepted_tokens"))),
    ]


def _prefix_cache_section(result: dict[str, Any]) -> list[str]:
    cache = result.get("prefix_cache") or {}
    lines = [
        title("Prefix Cache", "-"),
        row("Cached prompt tokens (usage):", _count(result.get("total_cached_tokens"))),
        row("Server lookups / hits (tokens):", f"{_fmt(cache.get('queries'))} / {_fmt(cache.get('hits'))}"),
        row("Hit rate (%):", None if cache.get("hit_rate") is None else 100.0 * cache["hit_rate"]),
    ]
    for t in result.get("multi_turn") or []:
        rate = "n/a" if t["hit_rate"] is None else f"{100.0 * t['hit_rate']:.1f}%"
        lines.append(row(f"Turn {t['turn']} (TTFT, prompt, cached):",
                         f"{_fmt(t['mean_ttft_ms'], ' ms')}, {_fmt(t['mean_prompt_tokens'])}, {rate}"))
    return lines


def save_result(result: dict[str, Any], path: str) -> None:
    """Write the result as JSON (NaN/inf become null), creating parent directories."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(_json_safe(result), indent=2) + "\n", encoding="utf-8")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
