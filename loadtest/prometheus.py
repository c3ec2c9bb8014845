"""Server-side figures from the Prometheus ``/metrics`` text, scraped before and after the run.

Tokens per forward per mode =
    delta(trimode:generation_tokens_total{mode}) / delta(trimode:forward_passes_total{mode});
speculative decoding from the trimode:spec_decode_* counters. Anything missing becomes None ("n/a").
"""

from __future__ import annotations

import math
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, dict[str, str], float]

GEN_TOKENS = "trimode:generation_tokens"
FORWARD_PASSES = "trimode:forward_passes"
SPEC_DRAFTS = "trimode:spec_decode_num_drafts"
SPEC_DRAFT_TOKENS = "trimode:spec_decode_num_draft_tokens"
SPEC_ACCEPTED = "trimode:spec_decode_num_accepted_tokens"


def parse_metrics(text: str) -> list[Sample] | None:
    """All samples of a Prometheus text exposition as ``(name, labels, value)``; None if it does not parse."""
    try:
        return [
            (s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]
    except Exception:  # malformed exposition: treat as "no metrics"
        return None


async def scrape(client: httpx.AsyncClient, root_url: str) -> list[Sample] | None:
    """GET /metrics and parse it; None when unreachable (the run goes on without server figures)."""
    try:
        resp = await client.get(root_url.rstrip("/") + "/metrics", timeout=10.0)
        resp.raise_for_status()
    except Exception:
        return None
    return parse_metrics(resp.text)


def counter_value(
    samples: list[Sample] | None, name: str, model: str | None, mode: str | None = None
) -> float | None:
    """Sum of counter ``name`` (``name_total`` on the wire) over series of ``model`` (and ``mode``).

    Series without a model_name label always count; if no series matches the model, all series count.
    None when the counter is absent.
    """
    if not samples:
        return None
    wanted = {name if name.endswith("_total") else name + "_total"}
    series = [s for s in samples if s[0] in wanted]
    if not series:
        series = [s for s in samples if s[0] == name]
    if mode is not None:
        series = [s for s in series if s[1].get("mode") == mode]
    if not series:
        return None
    if model is not None:
        mine = [s for s in series if s[1].get("model_name", model) == model]
        series = mine or series
    return sum(s[2] for s in series if not math.isnan(s[2]))


def counter_delta(
    before: list[Sample] | None,
    after: list[Sample] | None,
    name: str,
    model: str | None,
    mode: str | None = None,
) -> float | None:
    """after - before for one counter; a series absent before the run counts as 0 then."""
    if before is None or after is None:
        return None  # no baseline: a delta would include everything since server start
    end = counter_value(after, name, model, mode)
    if end is None:
        return None
    return end - (counter_value(before, name, model, mode) or 0.0)


def modes_in(samples: list[Sample] | None, *names: str) -> set[str]:
    """Values of the ``mode`` label found on the given counters."""
    wanted = {n + suffix for n in names for suffix in ("", "_total")}
    return {s[1]["mode"] for s in samples or [] if s[0] in wanted and "mode" in s[1]}


def tokens_per_forward(
    before: list[Sample] | None, after: list[Sample] | None, model: str | None, modes: set[str]
) -> dict[str, dict[str, float | None]]:
    """Per mode: generation-token and forward-pass deltas and their ratio (None when unknown)."""
    table: dict[str, dict[str, float | None]] = {}
    for mode in sorted(modes | modes_in(after, GEN_TOKENS, FORWARD_PASSES)):
        gen = counter_delta(before, after, GEN_TOKENS, model, mode)
        fwd = counter_delta(before, after, FORWARD_PASSES, model, mode)
        ratio = gen / fwd if gen is not None and fwd else None
        table[mode] = {"generation_tokens": gen, "forward_passes": fwd, "tokens_per_forward": ratio}
    return table


def prefix_cache(before: list[Sample] | None, after: list[Sample] | None, model: str | None) -> dict[str, Any]:
    """Prompt tokens the server looked up in its prefix cache, the ones it found, and the hit rate (0..1)."""
    queries = counter_delta(before, after, "trimode:prefix_cache_queries", model)
    hits = counter_delta(before, after, "trimode:prefix_cache_hits", model)
    return {"queries": queries, "hits": hits,
            "hit_rate": hits / queries if hits is not None and queries else None}


def spec_decode(before: list[Sample] | None, after: list[Sample] | None, model: str | None) -> dict[str, Any]:
    """Drafts, draft tokens, accepted tokens, acceptance rate (%) and length (1 + accepted / drafts)."""
    drafts = counter_delta(before, after, SPEC_DRAFTS, model)
    draft_tokens = counter_delta(before, after, SPEC_DRAFT_TOKENS, model)
    accepted = counter_delta(before, after, SPEC_ACCEPTED, model)
    return {
        "num_drafts": drafts,
        "num_draft_tokens": draft_tokens,
        "num_accepted_tokens": accepted,
        "acceptance_rate": accepted / draft_tokens * 100.0 if accepted is not None and draft_tokens else None,
        "acceptance_length": 1.0 + accepted / drafts if accepted is not None and drafts else None,
    }
