"""Admission by capacity: requests are priced in KV pages and decode forwards before they are admitted.

The prices are worst cases (`engine.policy.RequestPolicy`), checked here against what the engine really holds and
runs; the admission decisions are checked with the engine held at a `StepGate`, so admitted requests cannot
finish while the test looks, and with sizes that are over or under the bounds by construction (no timing).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from engine.config import EngineConfig
from engine.sequence import SamplingParams
from server.app import create_app
from server.config import ServerConfig
from tests.server.conftest import make_engine
from tests.server.gate import StepGate
from tests.server.helpers import metric
from tests.server_fixtures import live_server

PROMPT = [5] * 8  # token ids: the price does not depend on a tokenizer
POOL_TOKENS = 1024  # 64 pages of 16 tokens; the tiny checkpoint's context (512) still fits in it


@pytest.fixture(scope="module")
def engine(ckpt: Path):
    return make_engine(ckpt, num_kv_tokens=POOL_TOKENS)


@contextmanager
def serve(engine, **cfg) -> Iterator[str]:
    with live_server(create_app(engine, ServerConfig(max_n=8, **cfg))) as url:
        yield url


def _wait_load(client: httpx.Client, url: str, n: int) -> None:
    """Until `n` requests are admitted (the server admits before the engine sees them, and never undoes it)."""
    t0 = time.monotonic()
    while client.get(f"{url}/load").json()["server_load"] < n:
        assert time.monotonic() - t0 < 120, f"{n} request(s) were not admitted"  # a hang guard only
        time.sleep(0.01)


def _run_alone(engine, params: SamplingParams) -> tuple[int, int]:
    """(peak KV pages held, decode forwards) of one request run to the end on a private engine."""
    run, peak = engine.runner.run, [0]

    def measured(batch, *args, **kwargs):  # slots are reserved for the whole batch before its forward runs
        peak[0] = max(peak[0], engine.num_total_blocks - engine.num_free_blocks)
        return run(batch, *args, **kwargs)

    engine.runner.run = measured
    engine.add_request("probe-price", list(PROMPT), params)
    forwards = 0
    while engine.has_unfinished():
        for out in engine.step():
            forwards = out.num_decode_forwards
    assert engine.num_free_blocks == engine.num_total_blocks
    return peak[0], forwards


@pytest.mark.parametrize("mode,knobs,exact_pages,exact_forwards", [
    ("ar", {}, False, True),  # ar holds prompt + max_tokens - 1 positions: within the price's page
    ("self_spec", {"block_length": 8}, False, False),
    ("self_spec", {"block_length": 8, "threshold": 0.9}, False, False),
    ("diffusion", {"block_length": 8, "steps": 8, "threshold": 1.0}, True, False),
])
def test_the_prices_bound_what_the_engine_really_holds_and_runs(ckpt: Path, mode: str, knobs: dict,
                                                                 exact_pages: bool, exact_forwards: bool) -> None:
    engine = make_engine(ckpt, num_kv_tokens=POOL_TOKENS)
    policy = engine.policy
    # 8 + 60 tokens: 68 positions for ar (5 pages of 16); diffusion blocks of 8 reach 8 + 64 = 72, still 5 pages
    params = policy.resolve_params(SamplingParams(max_tokens=60, mode=mode, ignore_eos=True, temperature=0, **knobs))
    peak, forwards = _run_alone(engine, params)
    assert peak <= policy.kv_pages(len(PROMPT), params)
    assert forwards <= policy.max_decode_forwards(params)
    if exact_pages:
        assert peak == policy.kv_pages(len(PROMPT), params)
    if exact_forwards:
        assert forwards == policy.max_decode_forwards(params)


def test_diffusion_reaches_its_forward_price_exactly(ckpt: Path) -> None:
    """steps = block_length, no threshold: each denoise step commits one of a block's L - 1 masks; (max_tokens - 1)
    % L == 0 makes the last block need its commit too, so the engine runs the worst case the policy prices."""
    engine = make_engine(ckpt, num_kv_tokens=POOL_TOKENS)
    params = engine.policy.resolve_params(SamplingParams(max_tokens=17, mode="diffusion", block_length=8, steps=8,
                                                         threshold=1.0, ignore_eos=True))
    _, forwards = _run_alone(engine, params)
    assert forwards == engine.policy.max_decode_forwards(params) == 2 * (7 + 1)


def test_the_policy_ships_the_pool_and_the_default_forward_cap(engine) -> None:
    policy = engine.policy
    assert policy.kv_page_size == 16 and policy.kv_num_pages == POOL_TOKENS // 16
    assert policy.max_forwards == 2 * engine.max_model_len  # [engine] max_forwards_per_request = None


def _post(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "temperature": 0, "ignore_eos": True, **body},
                      timeout=60)


def test_a_request_that_can_never_fit_is_a_400_with_the_numbers(engine) -> None:
    with serve(engine) as url:
        # 4 x (8 + 400 tokens) = 4 x 26 pages = 104 > the 64-page pool
        r = _post(url, max_tokens=400, n=4)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "max_tokens" and err["code"] == 400
        for number in ("max_tokens 400", "104 KV pages", "4 sequence(s)", "64 pages", "max_queued_kv_factor 1"):
            assert number in err["message"], err["message"]
        # the prompts alone: 8 x (300 + 1 tokens) = 8 x 19 pages = 152 > 64, whatever max_tokens
        r = _post(url, prompt=[5] * 300, max_tokens=1, n=8)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert "152 KV pages" in r.json()["error"]["message"]
        assert metric(url, "trimode:num_requests_running") == 0
        assert _post(url, max_tokens=400, n=2).status_code == 200  # 52 pages: fits


def test_admitted_kv_past_the_bound_is_a_503_with_retry_after_until_it_frees(engine) -> None:
    gate = StepGate(engine)  # admitted requests stay admitted: the engine cannot finish them
    try:
        with serve(engine, retry_after=2) as url, httpx.Client(timeout=60) as client:
            held: list[httpx.Response] = []
            big = threading.Thread(target=lambda: held.append(_post(url, max_tokens=400, n=2)))  # 52 of 64 pages
            big.start()
            assert gate.wait_blocked()
            _wait_load(client, url, 1)
            r = client.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 200})  # 13 more: 65
            assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
            assert "KV pages" in r.json()["error"]["message"] and "52 of the 64" in r.json()["error"]["message"]
            assert metric(url, "trimode:requests_rejected_total", reason="queue_kv") == 1
            small = threading.Thread(target=lambda: held.append(_post(url, max_tokens=100)))  # 7 more: 59 fit
            small.start()
            _wait_load(client, url, 2)
            gate.open()
            big.join(60)
            small.join(60)
            assert [r.status_code for r in held] == [200, 200]
            assert client.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 200}).status_code \
                == 200  # the pages came back
    finally:
        gate.remove()


def test_at_the_default_bound_admitted_work_never_preempts(engine) -> None:
    """Five identical sequences need 5 x 16 = 80 pages at their peaks, four need 64: the whole pool. Past the pool
    (factor 1.25) they preempt one another; at the default factor the five are refused and the four never do."""
    body = {"max_tokens": 248, "n": 5}  # 8 + 248 = 256 tokens: 16 pages each
    gate = StepGate(engine)  # all five are added before they run, so they grow side by side
    try:
        with serve(engine, max_queued_kv_factor=1.25) as url, httpx.Client(timeout=60) as client:
            done: list[httpx.Response] = []
            t = threading.Thread(target=lambda: done.append(_post(url, **body)))
            t.start()
            _wait_load(client, url, 1)  # generate() queued all five Adds before it returned
            gate.open()
            t.join(60)
            assert done[0].status_code == 200
            assert metric(url, "trimode:num_preemptions_total") > 0
    finally:
        gate.remove()
    with serve(engine) as url:
        r = _post(url, **body)
        assert r.status_code == 400 and "80 KV pages" in r.json()["error"]["message"]
        assert _post(url, **{**body, "n": 4}).status_code == 200
        assert metric(url, "trimode:num_preemptions_total") == 0


def test_max_queued_tokens_still_bounds_admission(engine) -> None:
    with serve(engine, max_queued_tokens=100) as url:
        r = _post(url, max_tokens=200)
        assert r.status_code == 503 and "tokens queued" in r.json()["error"]["message"]


# ---- the forward cap ---------------------------------------------------------------------------------------------


def test_threshold_drafting_past_the_forward_cap_is_a_400_naming_threshold(engine) -> None:
    with serve(engine) as url:
        # cap 2 x 512 = 1024; block 16 with a threshold: 399 verifies + up to 15 drafts each = 6264 forwards
        r = _post(url, max_tokens=400, mode="self_spec", block_length=16, threshold=0.9)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "threshold"
        for number in ("6264 decode forwards", "max_forwards_per_request of 1024", "block_length 16",
                       "one draft forward per round: 797"):
            assert number in err["message"], err["message"]
        # the same request drafting in one forward per round fits
        assert _post(url, max_tokens=400, mode="self_spec", block_length=16).status_code == 200


def test_a_smaller_forward_cap_names_steps_or_max_tokens(ckpt: Path) -> None:
    engine = make_engine(ckpt, num_kv_tokens=POOL_TOKENS, max_forwards_per_request=50)
    with serve(engine) as url:
        # 13 blocks of 8 for 99 tokens, 7 denoise steps (one per mask) + 1 commit each = 104; with 1 step: 26
        r = _post(url, max_tokens=100, mode="diffusion", block_length=8, steps=8)
        assert r.status_code == 400 and r.json()["error"]["param"] == "steps", r.text
        assert "104 decode forwards" in r.json()["error"]["message"] and "1 step: 26" in r.json()["error"]["message"]
        r = _post(url, max_tokens=100, mode="ar")
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        assert "99 decode forwards" in r.json()["error"]["message"]
        assert _post(url, max_tokens=51, mode="ar").status_code == 200  # 50 forwards: at the cap
    with pytest.raises(ValueError, match="max_forwards_per_request"):
        EngineConfig(max_forwards_per_request=0)


@pytest.mark.parametrize("mode,knobs", [("ar", {}), ("diffusion", {"block_length": 8, "steps": 3}),
                                        ("self_spec", {"block_length": 8}),
                                        ("self_spec", {"block_length": 16, "threshold": 0.9}),
                                        ("auto", {"block_length": 4, "threshold": 0.5})])
def test_the_largest_max_tokens_is_the_last_one_each_bound_admits(engine, mode: str, knobs: dict) -> None:
    """The closed forms against the prices they invert: m passes the forward cap and the context, m + 1 does not
    pass one of them (every cap, so that either bound can be the one that binds)."""
    base = engine.policy
    for cap in (1, 2, 3, 7, 50, 97, 1024, 5000):
        policy = dataclasses.replace(base, max_forwards=cap)
        for prompt in (8, 300, 505):
            params = policy.resolve_params(SamplingParams(mode=mode, **knobs))
            m = policy.largest_max_tokens(prompt, params)
            if m < 1:
                continue
            policy.check_request([5] * prompt, dataclasses.replace(params, max_tokens=m))
            with pytest.raises(ValueError):
                policy.check_request([5] * prompt, dataclasses.replace(params, max_tokens=m + 1))


def test_a_request_without_max_tokens_runs_the_most_the_forward_cap_allows(ckpt: Path) -> None:
    """The context leaves room for ~500 tokens; the cap of 50 decode forwards allows 51 ar tokens (the prefill
    gives the first) and 49 diffusion ones (6 blocks of 8, 7 steps + a commit each = 48 forwards, then the seed).
    Filled to the context, the request would be refused by the cap; filled by a guess, it would end early."""
    engine = make_engine(ckpt, num_kv_tokens=POOL_TOKENS, max_forwards_per_request=50)
    with serve(engine) as url:
        for knobs, tokens in (({"mode": "ar"}, 51), ({"mode": "diffusion", "block_length": 8, "steps": 8}, 49)):
            r = _post(url, max_tokens=None, **knobs)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == tokens and \
                r.json()["choices"][0]["finish_reason"] == "length", r.text
