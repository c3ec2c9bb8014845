"""Concurrency and cancellation on the live server: mixed-mode batches, client disconnects freeing KV at once.

The engine is held (tests/server/held_engine.py) where a test needs requests side by side or still unfinished:
the 16 streams are all admitted before it steps, and a request is disconnected while it cannot have finished.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from engine.decoding.modes import MODES
from tests.server.held_engine import BOUND, HeldEngine, wait_for
from tests.server.helpers import metric, scrape, sse_json

FORWARD_KINDS = ("prefill", "ar_decode", "denoise", "commit", "draft", "verify")


def _batch_counts(url: str) -> dict[str, tuple[float, float]]:
    """forward_kind -> (forwards, forwards of batch size 1)."""
    m = scrape(url)
    return {k: (m[("trimode:batch_size_count", (("forward_kind", k),))],
                m[("trimode:batch_size_bucket", (("forward_kind", k), ("le", "1.0")))]) for k in FORWARD_KINDS}


def test_16_concurrent_streams_mixing_modes_and_steps_all_complete(server: str, shared_engine) -> None:
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

    async def main(held: HeldEngine) -> list[tuple[str, dict]]:
        async with httpx.AsyncClient(timeout=120) as client:
            runs = asyncio.gather(*(one(client, i, s) for i, s in enumerate(specs)))
            stop = time.monotonic() + BOUND
            while (await client.get(f"{server}/load")).json()["server_load"] < 16:  # all admitted, none stepped
                assert time.monotonic() < stop and not runs.done(), "the 16 requests were not all admitted"
                await asyncio.sleep(0.01)
            held.gate.open()
            return await runs

    with HeldEngine(shared_engine) as held:
        results = asyncio.run(main(held))
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


def _idle(url: str) -> bool:
    m = scrape(url)
    return m[("trimode:num_requests_running", ())] == 0 and m[("trimode:kv_cache_usage_perc", ())] == 0


def _abort_freed_before_the_next_step(url: str, held: HeldEngine, disconnects: float) -> None:
    """Once the server has seen the disconnect (its Abort is queued), the engine, let go, must be idle after at
    most the one step that was already waiting: the Abort is applied before any later step."""
    wait_for(lambda: metric(url, "trimode:http_requests_client_disconnected_total") == disconnects + 1,
             "the disconnect was not noticed")
    steps = held.gate.steps_started
    held.gate.open()
    wait_for(lambda: _idle(url), "the disconnected request still runs or holds KV")
    assert held.gate.steps_started - steps <= 1


def test_client_disconnect_mid_stream_aborts_and_frees_kv_before_the_next_step(server: str, shared_engine) -> None:
    disconnects = metric(server, "trimode:http_requests_client_disconnected_total")
    aborts = metric(server, "trimode:request_success_total", mode="self_spec", finished_reason="abort")
    body = {"prompt": "Go on and on", "max_tokens": 480, "temperature": 0, "ignore_eos": True, "mode": "self_spec"}
    with HeldEngine(shared_engine) as held, httpx.Client(timeout=30) as client:
        (r,) = held.open_streams(client, server, [body])  # it holds its first token and cannot go on
        assert next(r.iter_lines()).startswith("data: ")
        assert metric(server, "trimode:num_requests_running") == 1
        assert metric(server, "trimode:kv_cache_usage_perc") > 0
        r.close()
        _abort_freed_before_the_next_step(server, held, disconnects)
    assert metric(server, "trimode:request_success_total", mode="self_spec", finished_reason="abort") == aborts + 1


def test_client_disconnect_without_streaming_aborts_too(server: str, shared_engine) -> None:
    disconnects = metric(server, "trimode:http_requests_client_disconnected_total")
    body = {"prompt": "Go on", "max_tokens": 480, "temperature": 0, "ignore_eos": True, "mode": "ar"}
    with HeldEngine(shared_engine) as held:
        # held: the response cannot start, so the client's read timeout certainly comes first
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server}/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.1))
        _abort_freed_before_the_next_step(server, held, disconnects)
