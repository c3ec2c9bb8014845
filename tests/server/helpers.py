"""Small helpers shared by the server tests: metrics scraping and raw SSE parsing."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels without model_name): value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


def metric(url: str, name: str, **labels: str) -> float:
    return scrape(url).get((name, tuple(sorted(labels.items()))), 0.0)


def sse_events(raw: bytes) -> list[str]:
    """Split a raw SSE body into event payloads, asserting the exact `data: ...\\n\\n` framing."""
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    parts = raw.split(b"\n\n")
    assert parts[-1] == b""
    events = []
    for p in parts[:-1]:
        assert p.startswith(b"data: ") and b"\n" not in p, p
        events.append(p[len(b"data: "):].decode())
    return events


def sse_json(raw: bytes) -> list[dict]:
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]
