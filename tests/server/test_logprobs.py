"""logprobs over the API in every mode: one entry per generated token, streamed or not, in OpenAI's two shapes."""

from __future__ import annotations

import httpx
import pytest

from engine.decoding.modes import MODES
from tests.server.helpers import sse_json

BODY = {"prompt": "Once upon", "max_tokens": 12, "temperature": 0, "ignore_eos": True}


def assert_same(streamed: list, whole: list, key: str, mode: str) -> None:
    """Streamed logprobs equal the non-streamed ones; auto may decode the two requests through different rows (an
    ar decode's, a verify's): the same tokens, logprobs equal to float noise."""
    if mode != "auto" or key in ("tokens", "text_offset"):
        assert streamed == whole
        return
    assert len(streamed) == len(whole)
    for a, b in zip(streamed, whole):
        if isinstance(a, dict):
            assert a.keys() == b.keys() and a == pytest.approx(b, abs=1e-5)
        else:
            assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_completions_logprobs_cover_every_token_and_stream_the_same(server: str, mode: str) -> None:
    body = {**BODY, "mode": mode, "logprobs": 2}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()
    choice, lp = r["choices"][0], r["choices"][0]["logprobs"]
    n = r["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    # the char tokenizer: one character per token, so the tokens spell the text, but for EOS (ignore_eos), which
    # the text skips and the logprobs spell out
    assert choice["text"] == "".join(t for t in lp["tokens"] if t != "</s>")
    offsets = [sum(t != "</s>" for t in lp["tokens"][:i]) for i in range(n)]
    assert lp["text_offset"] == offsets
    for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert tok in top and 2 <= len(top) <= 3 and value <= 0
        assert value == max(top.values())  # greedy: every mode emits the top token of the row it chose from
    chunks = sse_json(httpx.post(f"{server}/v1/completions", json={**body, "stream": True}, timeout=60).content)
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert_same([x for part in streamed for x in part[key]], lp[key], key, mode)


@pytest.mark.parametrize("mode", MODES)
def test_echo_with_logprobs_scores_the_prompt_first(server: str, mode: str) -> None:
    body = {**BODY, "mode": mode, "logprobs": 1, "echo": True, "max_tokens": 6}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()
    lp, usage = r["choices"][0]["logprobs"], r["usage"]
    n_prompt = usage["prompt_tokens"]
    assert len(lp["tokens"]) == n_prompt + usage["completion_tokens"]
    assert "".join(lp["tokens"][:n_prompt]) == BODY["prompt"] and r["choices"][0]["text"].startswith(BODY["prompt"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:]) and all(len(t) <= 2 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"][:n_prompt + 1] == list(range(n_prompt + 1))  # one character per prompt token
    # the completion part is what the same request without echo reports (to float noise: the LM head then runs
    # over every prompt row, a GEMM of another shape)
    plain = httpx.post(f"{server}/v1/completions", json={**body, "echo": False}, timeout=60).json()
    assert lp["tokens"][n_prompt:] == plain["choices"][0]["logprobs"]["tokens"]
    assert lp["token_logprobs"][n_prompt:] == pytest.approx(plain["choices"][0]["logprobs"]["token_logprobs"],
                                                            abs=1e-5)
    chunks = sse_json(httpx.post(f"{server}/v1/completions", json={**body, "stream": True}, timeout=60).content)
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert_same([x for part in streamed for x in part[key]], lp[key], key, mode)


def test_chat_logprobs_with_top_alternatives(server: str) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 3, "n": 2, "seed": 1, "mode": "self_spec"}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()
    assert r["usage"]["completion_tokens"] == 16
    for choice in r["choices"]:
        content = choice["logprobs"]["content"]
        assert "".join(e["token"] for e in content if e["token"] != "</s>") == choice["message"]["content"]
        for e in content:
            assert e["bytes"] == list(e["token"].encode()) and len(e["top_logprobs"]) == 3
            assert e["top_logprobs"][0]["token"] == e["token"] and e["top_logprobs"][0]["logprob"] == e["logprob"]
    chunks = sse_json(httpx.post(f"{server}/v1/chat/completions", json={**body, "stream": True}, timeout=60).content)
    for i, choice in enumerate(r["choices"]):
        streamed = [e for c in chunks for ch in c["choices"] if ch["index"] == i and ch["logprobs"]
                    for e in ch["logprobs"]["content"]]
        # the same tokens; logprobs to float noise: the second request finds the prompt's pages in the prefix
        # cache, so its prefill computes fewer rows (GEMMs of another shape)
        whole = choice["logprobs"]["content"]
        assert [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in streamed] == \
            [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in whole]
        for a, b in zip(streamed, whole):
            assert a["bytes"] == b["bytes"] and a["logprob"] == pytest.approx(b["logprob"], abs=1e-5)
            assert [t["logprob"] for t in a["top_logprobs"]] == pytest.approx(
                [t["logprob"] for t in b["top_logprobs"]], abs=1e-5)


def test_no_logprobs_unless_asked(server: str) -> None:
    r = httpx.post(f"{server}/v1/completions", json=BODY, timeout=60).json()
    assert r["choices"][0]["logprobs"] is None
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                         "max_tokens": 4, "logprobs": False}, timeout=60).json()
    assert r["choices"][0]["logprobs"] is None
