"""Prefix caching over HTTP: `usage.prompt_tokens_details.cached_tokens` (completions and chat, streamed and not),
the prefix-cache counters in /metrics, `cache_salt`, and POST /reset_prefix_cache behind the API key."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.config import ServerConfig
from tests.server.conftest import make_engine
from tests.server.helpers import metric, sse_json
from tests.server_fixtures import live_server

KEY = "sk-prefix-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
# the char tokenizer: one token per character, so this prompt holds 3 full 16-token blocks (the last one not
# reusable: a prompt's last token is always recomputed)
LONG = "The quick brown fox jumps over the lazy dog; " * 2


@pytest.fixture(scope="module")
def url(ckpt: Path):
    engine = make_engine(ckpt, num_kv_tokens=4096)
    with live_server(create_app(engine, ServerConfig(api_key=KEY, max_n=4))) as base:
        yield base


def _complete(url: str, **body) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"max_tokens": 3, "temperature": 0, **body}, headers=AUTH,
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _cached(usage: dict) -> int:
    return usage["prompt_tokens_details"]["cached_tokens"]


def _reset(url: str) -> None:
    assert httpx.post(f"{url}/reset_prefix_cache", headers=AUTH, timeout=30).status_code == 200


def test_cached_tokens_are_reported_and_counted_in_the_metrics(url: str) -> None:
    _reset(url)
    queries, hits = metric(url, "trimode:prefix_cache_queries_total"), metric(url, "trimode:prefix_cache_hits_total")
    first = _complete(url, prompt=LONG)
    n = first["usage"]["prompt_tokens"]
    assert _cached(first["usage"]) == 0
    second = _complete(url, prompt=LONG + "!")
    want = (n + 1 - 1) // 16 * 16
    assert _cached(second["usage"]) == want > 0
    assert metric(url, "trimode:prefix_cache_queries_total") - queries == 2 * n + 1
    assert metric(url, "trimode:prefix_cache_hits_total") - hits == want
    # n > 1: every choice shares the prompt, the usage counts the prompt (and its cached tokens) once
    both = _complete(url, prompt=[LONG, LONG + "?"], n=2)
    assert _cached(both["usage"]) == (n - 1) // 16 * 16 + want and both["usage"]["prompt_tokens"] == 2 * n + 1
    streamed = sse_json(httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=60, json={
        "prompt": LONG, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}).content)
    assert _cached(streamed[-1]["usage"]) == (n - 1) // 16 * 16


def test_chat_reports_cached_tokens_of_a_resent_conversation(url: str) -> None:
    messages = [{"role": "user", "content": LONG}]
    body = {"messages": messages, "max_tokens": 4, "temperature": 0}
    r1 = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60).json()
    turn2 = messages + [r1["choices"][0]["message"], {"role": "user", "content": "And then?"}]
    r2 = httpx.post(f"{url}/v1/chat/completions", json={**body, "messages": turn2}, headers=AUTH, timeout=60).json()
    assert _cached(r2["usage"]) >= r1["usage"]["prompt_tokens"] // 16 * 16 - 16 > 0
    chunks = sse_json(httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=60, json={
        **body, "messages": turn2, "stream": True, "stream_options": {"include_usage": True}}).content)
    assert _cached(chunks[-1]["usage"]) >= _cached(r2["usage"])


def test_a_request_with_another_cache_salt_never_hits(url: str) -> None:
    _complete(url, prompt=LONG, cache_salt="tenant-a")
    assert _cached(_complete(url, prompt=LONG, cache_salt="tenant-b")["usage"]) == 0
    assert _cached(_complete(url, prompt=LONG, cache_salt="tenant-a")["usage"]) > 0
    r = httpx.post(f"{url}/v1/completions", json={"prompt": LONG, "cache_salt": ""}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_reset_prefix_cache_needs_the_key_and_empties_the_cache(url: str) -> None:
    _complete(url, prompt=LONG)
    assert _cached(_complete(url, prompt=LONG)["usage"]) > 0
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{url}/reset_prefix_cache", headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
    assert _cached(_complete(url, prompt=LONG)["usage"]) > 0  # refused resets changed nothing
    _reset(url)
    assert _cached(_complete(url, prompt=LONG)["usage"]) == 0  # sent after the 200: the cache was empty


def test_the_cli_switch_turns_prefix_caching_off_and_on() -> None:
    from server.cli import build_parser, overrides_from

    parser = build_parser()
    assert overrides_from(parser.parse_args(["serve", "--no-enable-prefix-caching"]))["engine"] == {
        "enable_prefix_caching": False}
    assert overrides_from(parser.parse_args(["serve", "--enable-prefix-caching"]))["engine"] == {
        "enable_prefix_caching": True}
    assert "enable_prefix_caching" not in overrides_from(parser.parse_args(["serve"]))["engine"]
