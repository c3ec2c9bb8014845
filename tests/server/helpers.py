"""Small helpers shared by the server tests: a live server on an engine, metrics scraping, raw SSE parsing, and
draining an AsyncEngine generation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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


@contextmanager
def serve(engine: Any, **cfg: Any) -> Iterator[str]:
    """A live server (its URL) over `engine`, with these ServerConfig fields."""
    from server.app import create_app
    from server.config import ServerConfig
    from tests.server_fixtures import live_server

    with live_server(create_app(engine, ServerConfig(**cfg))) as url:
        yield url


async def drain(gen: Any) -> list[Any]:
    """Every output of an AsyncEngine generation until each choice has seen its final one."""
    outs, open_ = [], set(range(len(gen.tracks)))
    while open_:
        index, out = await gen.next()
        outs.append(out)
        if out.finish_reason is not None:
            open_.discard(index)
    return outs
