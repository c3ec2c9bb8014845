"""Concurrency and cancellation on the live server: mixed-mode batches, client disconnects freeing KV at once."""

from __future__ import annotations

import asyncio
import time

import httpx

from engine.decoding.modes import MODES
from tests.server.helpers import metric, scrape, sse_json

FORWARD_KINDS = ("prefill", "ar_decode", "denoise", "commit", "draft", "verify")


def _batch_counts(url: str) -> dict[str, tuple[float, float]]:
    """forward_kind -> (forwards, forwards of batch size 1)."""
    m = scrape(url)
    return {k: (m[("trimode:batch_size_count", (("forward_kind", k),))],
                m[("trimode:batch_size_bucket", (("forward_kind", k), ("le", "1.0")))]) for k in FORWARD_KINDS}


def test_16_concurrent_streams_mixing_modes_and_steps_all_complete(server: str) -> None:
    specs = ([{"mode": "ar"}] * 5 + [{"mode": "self_spec", "block_length": b} for b in (4, 8, 8, 8, 16)]
             + [{"mode": "diffusion", "steps": s, "block_length": 8} for s in (2, 4, 8, 8, 4, 2)])
    assert len(specs) == 16
    before = _batch_counts(server)

    async def one(client: httpx.AsyncClient, i: int, spec: dict) -> tuple[str, dict]:
        body = {"prompt": f"Request number {i}", "max_tokens": 24, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}, **spec}
        r = await client.post(f"{server}/v1/completions", json=body)
        assert r.status_code == 200, r.text
        chunks = sse_json(r.content)
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 24 and chunks[0]["mode"] == spec["mode"]
        return text, spec

    async def main() -> list[tuple[str, dict]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i, s) for i, s in enumerate(specs)))

    results = asyncio.run(main())
    assert len(results) == 16
    for i, (text, spec) in enumerate(results):  # greedy ar / self_spec: the same text as when run alone
        if spec["mode"] != "diffusion":
            alone = httpx.post(f"{server}/v1/completions", timeout=60, json={
                "prompt": f"Request number {i}", "max_tokens": 24, "temperature": 0, "ignore_eos": True, **spec})
            assert alone.json()["choices"][0]["text"] == text, spec
    after = _batch_counts(server)
    # prefill chunks mostly ride along with causal decode forwards (counted under the decode kind), so pure prefill
    # forwards may all be single; tests/test_engine_scheduling.py checks the mixed batches themselves
    assert after["prefill"][0] - before["prefill"][0] > 0
    for kind in FORWARD_KINDS[1:]:
        forwards = after[kind][0] - before[kind][0]
        singles = after[kind][1] - before[kind][1]
        assert forwards - singles > 0, f"no batch larger than one for {kind}: {forwards} forwards, {singles} single"
    m = scrape(server)
    for mode in MODES:
        assert m[("trimode:forward_passes_total", (("mode", mode),))] > 0
        assert m[("trimode:generation_tokens_total", (("mode", mode),))] >= 24
    assert m[("trimode:spec_decode_num_drafts_total", ())] > 0
    assert m[("trimode:diffusion_denoise_steps_per_block_count", ())] > 0
    assert m[("trimode:num_requests_running", ())] == 0


def _wait_idle(url: str, within: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        m = scrape(url)
        if m[("trimode:num_requests_running", ())] == 0 and m[("trimode:kv_cache_usage_perc", ())] == 0:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"still running after {within}s: {m[('trimode:num_requests_running', ())]}")


def test_client_disconnect_mid_stream_aborts_and_frees_kv_within_a_second(server: str) -> None:
    disconnects = metric(server, "trimode:http_requests_client_disconnected_total")
    body = {"prompt": "Go on and on", "max_tokens": 480, "temperature": 0, "stream": True, "ignore_eos": True,
            "mode": "self_spec"}
    with httpx.Client(timeout=30) as client, client.stream("POST", f"{server}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert metric(server, "trimode:num_requests_running") == 1
        assert metric(server, "trimode:kv_cache_usage_perc") > 0
    assert _wait_idle(server, 1.0) < 1.0
    assert metric(server, "trimode:http_requests_client_disconnected_total") == disconnects + 1
    assert metric(server, "trimode:request_success_total", mode="self_spec", finished_reason="abort") >= 1


def test_client_disconnect_without_streaming_aborts_too(server: str) -> None:
    disconnects = metric(server, "trimode:http_requests_client_disconnected_total")
    body = {"prompt": "Go on", "max_tokens": 480, "temperature": 0, "ignore_eos": True, "mode": "ar"}
    try:
        # 480 tokens take the test model about 0.5 s with the CPU kernels: give up well before that
        r = httpx.post(f"{server}/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.1))
        raise AssertionError(f"the request should have outlived the client timeout: {r.status_code} {r.text[:300]}")
    except httpx.ReadTimeout:
        pass
    assert _wait_idle(server, 1.0) < 1.0
    assert metric(server, "trimode:http_requests_client_disconnected_total") == disconnects + 1
