"""Reliability on dedicated servers: API key, body limit, overload 503 before the stream, deadlines, dead engine."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import make_engine
from tests.server.held_engine import HeldEngine, wait_for
from tests.server.helpers import metric, serve, sse_json

KEY = "sk-test-0123456789"
LONG = {"prompt": "Long one", "max_tokens": 400, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(ckpt: Path):
    return make_engine(ckpt, num_kv_tokens=4096)


def test_api_key_guards_all_but_probe_and_metrics_routes_and_is_never_logged(
        engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    auth = {"Authorization": f"Bearer {KEY}"}
    with serve(engine, api_key=KEY) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == 401 and r.json()["error"]["type"] == "AuthenticationError"
        guarded = [("GET", "/v1/models", None), ("GET", "/v1/models/x", None), ("GET", "/openapi.json", None),
                   ("GET", "/docs", None), ("GET", "/no-such-route", None), ("POST", "/tokenize", {"prompt": "x"}),
                   ("POST", "/detokenize", {"tokens": [5]}), ("POST", "/v1/chat/completions", {"messages": []})]
        for method, path, body in guarded:
            r = httpx.request(method, f"{url}{path}", json=body)
            assert r.status_code == 401 and r.json()["error"]["code"] == 401, (path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.post(f"{url}/tokenize", json={"prompt": "x"}, headers=auth).status_code == 200
        assert httpx.post(f"{url}/detokenize", json={"tokens": [5]}, headers=auth).status_code == 200
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2},
                        headers={"Authorization": f"bearer {KEY}"}, timeout=30)  # the scheme is case-insensitive
        assert ok.status_code == 200
        for path in ("/health", "/ready", "/metrics", "/load", "/version"):
            assert httpx.get(f"{url}{path}", timeout=30).status_code == 200, path
    assert KEY not in caplog.text
    assert "request_finished" in caplog.text


def test_body_over_the_limit_is_413_with_or_without_content_length(engine) -> None:
    with serve(engine, max_body_bytes=2048) as url:
        big = {"prompt": "x" * 5000}
        r = httpx.post(f"{url}/v1/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == 413

        def chunks() -> Iterator[bytes]:
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        r = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert metric(url, "trimode:requests_rejected_total", reason="body_too_large") == 2
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30).status_code \
            == 200


def idle(url: str) -> bool:
    return metric(url, "trimode:num_requests_running") == 0 and metric(url, "trimode:kv_cache_usage_perc") == 0


def test_full_queue_answers_503_with_retry_after_before_any_stream(engine) -> None:
    with serve(engine, max_queued_requests=2, retry_after=3) as url, HeldEngine(engine) as held, \
            httpx.Client(timeout=30) as client:
        streams = held.open_streams(client, url, [LONG, LONG])  # held: neither can finish and free its slot
        for body in ({"prompt": "x", "max_tokens": 2}, {"prompt": "x", "max_tokens": 2, "stream": True}):
            r = client.post(f"{url}/v1/completions", json=body)
            assert r.status_code == 503 and r.headers["retry-after"] == "3"
            assert r.headers["content-type"] == "application/json" and r.json()["error"]["code"] == 503
        assert metric(url, "trimode:requests_rejected_total", reason="queue_full") == 2
        for s in streams:
            s.close()
        held.gate.open()
        wait_for(lambda: client.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 2})
                 .status_code == 200, "the closed streams' slots were not released")


def test_token_budget_and_queue_timeout_reject_with_503(engine) -> None:
    with serve(engine, max_queued_tokens=100) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 200})
        assert r.status_code == 503 and "Retry-After" in r.headers
    with serve(engine, queue_timeout=0.001) as url, HeldEngine(engine) as held:
        # the engine is held: no first token can come within the queue timeout, however fast the machine
        r = httpx.post(f"{url}/v1/completions", json={**LONG, "stream": True}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["message"] == "Request queue timeout reached."
        assert metric(url, "trimode:requests_rejected_total", reason="queue_timeout") == 1
        assert metric(url, "trimode:request_success_total", mode="ar", finished_reason="abort") == 1
        held.gate.open()
        wait_for(lambda: idle(url), "the timed-out request was not aborted in the engine")


@pytest.mark.parametrize("stream", [False, True])
def test_request_deadline_ends_with_finish_reason_abort(engine, stream: bool) -> None:
    with ThreadPoolExecutor(1) as pool, serve(engine, request_timeout=30) as url, HeldEngine(engine) as held:
        pending = pool.submit(httpx.post, f"{url}/v1/completions",
                              json={**LONG, "timeout": 0.3, "stream": stream}, timeout=30)
        held.open_once_past(0.3)  # past its deadline before its first step: it cannot finish
        r = pending.result(30)
        assert r.status_code == 200
        last = sse_json(r.content)[-1]["choices"][0] if stream else r.json()["choices"][0]
        assert last["finish_reason"] == "abort"
        wait_for(lambda: idle(url), "the expired request's KV was not freed")


def test_dead_engine_fails_every_open_request_and_health_turns_503(ckpt: Path) -> None:
    engine = make_engine(ckpt, num_kv_tokens=4096)
    with serve(engine) as url, HeldEngine(engine) as held, httpx.Client(timeout=30) as client:
        # each stream holds its first token and the engine is held: neither can finish before the failure
        streams = held.open_streams(client, url, [LONG, {**LONG, "mode": "diffusion"}])
        readers = [s.iter_lines() for s in streams]
        for lines in readers:
            assert next(lines).startswith("data: ")
        result: dict[str, httpx.Response] = {}
        t = threading.Thread(target=lambda: result.setdefault(
            "r", httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                               **{k: v for k, v in LONG.items() if k != "prompt"}},
                            timeout=30)))
        t.start()
        wait_for(lambda: client.get(f"{url}/load").json()["server_load"] >= 3, "the chat request was not admitted")
        held.fail_next = RuntimeError("injected forward failure")
        held.gate.open()
        for lines in readers:
            rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            assert rest[-2].startswith('data: {"error":{') and '"code":500' in rest[-2]
        t.join(30)
        assert result["r"].status_code == 500 and result["r"].json()["error"]["code"] == 500
        assert client.get(f"{url}/health").status_code == 503
        assert client.get(f"{url}/ready").status_code == 503
        r = client.post(f"{url}/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == 503


class BatchFailure(RuntimeError):
    """What an engine raises when one forward fails: the requests of that batch, named."""

    def __init__(self, request_ids: list[str]) -> None:
        super().__init__("injected batch failure")
        self.request_ids = request_ids


def test_a_failed_batch_fails_only_its_requests_and_the_server_goes_on(engine) -> None:
    with serve(engine) as url, HeldEngine(engine) as held, httpx.Client(timeout=30) as client:
        victim, survivor = held.open_streams(client, url, [LONG, {**LONG, "max_tokens": 100}])  # both unfinished
        lines = [victim.iter_lines(), survivor.iter_lines()]
        first = [next(it) for it in lines]
        victim_id = json.loads(first[0][len("data: "):])["id"] + "-0"
        held.fail_next = BatchFailure([victim_id])  # the next step fails, for the victim only
        held.gate.open()
        rest = [line for line in lines[0] if line]
        assert rest[-1] == "data: [DONE]" and '"code":500' in rest[-2] and "forward pass failed" in rest[-2]
        tail = [line for line in lines[1] if line]
        assert tail[-1] == "data: [DONE]" and '"finish_reason":"length"' in tail[-2]
        assert client.get(f"{url}/health").status_code == 200
        r = client.post(f"{url}/v1/completions", json={"prompt": "after", "max_tokens": 3})
        assert r.status_code == 200
        assert metric(url, "trimode:kv_cache_usage_perc") == 0
