"""A battery of bad requests: each gets a 4xx in OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

MSG = [{"role": "user", "content": "hi"}]
C, CH = "/v1/completions", "/v1/chat/completions"

BAD = [  # (path, body, status, param)
    (C, {"prompt": "x", "model": "no-such-model"}, 404, "model"),
    (C, {}, 400, "prompt"),
    (C, {"prompt": ""}, 400, "prompt"),
    (C, {"prompt": []}, 400, "prompt"),
    (C, {"prompt": [[]]}, 400, "prompt"),
    (C, {"prompt": [5, 96]}, 400, "prompt"),
    (C, {"prompt": [-1]}, 400, "prompt"),
    (C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 10_000}, 400, "input_tokens"),
    (C, {"prompt": "x" * 600}, 400, "input_tokens"),
    (C, {"prompt": "x" * 5000}, 400, "input_tokens"),  # tokenized off the event loop
    (C, {"prompt": "x" * 1_000_000}, 400, "prompt"),  # refused before tokenizing
    (CH, {"messages": [{"role": "user", "content": "y" * 100_000}]}, 400, "messages"),
    (C, {"prompt": "x", "temperature": -1}, 400, "temperature"),
    (C, {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    (C, {"prompt": "x", "temperature": 1e308}, 400, "temperature"),
    (C, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (C, {"prompt": "x", "top_k": -2}, 400, "top_k"),
    (C, {"prompt": "x", "n": 0}, 400, "n"),
    (C, {"prompt": "x", "n": 9}, 400, "n"),
    (C, {"prompt": "x", "seed": 2**70}, 400, "seed"),
    (C, {"prompt": "x", "stop": ["a"] * 17}, 400, "stop"),
    (C, {"prompt": "x", "stop": "s" * 300}, 400, "stop"),
    (C, {"prompt": "x", "stop": 5}, 400, "stop"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (C, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (C, {"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    (C, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    (C, {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    (C, {"prompt": "x", "mode": "turbo"}, 400, "mode"),
    (C, {"prompt": "x", "mode": "diffusion", "steps": 0}, 400, "steps"),
    (C, {"prompt": "x", "mode": "diffusion", "steps": 9, "block_length": 8}, 400, "steps"),
    (C, {"prompt": "x", "mode": "diffusion", "block_length": 7}, 400, "block_length"),
    (C, {"prompt": "x", "mode": "diffusion", "threshold": 0}, 400, "threshold"),
    (C, {"prompt": "x", "mode": "diffusion", "threshold": 1.5}, 400, "threshold"),
    (C, {"prompt": "x", "timeout": -1}, 400, "timeout"),
    (CH, {"messages": []}, 400, "messages"),
    (CH, {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    (CH, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages"),
    (CH, {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    (CH, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CH, {"messages": MSG, "logprobs": True, "top_logprobs": -1}, 400, "top_logprobs"),
    (CH, {"messages": MSG, "tools": [{"type": "function", "function": {}}]}, 400, "tools"),  # no name
    (CH, {"messages": MSG, "response_format": {"type": "yaml"}}, 400, "response_format"),
    (CH, {"messages": MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (CH, {"messages": MSG, "max_tokens": 100_000}, 400, "input_tokens"),
    (CH, {"messages": MSG, "model": "gpt-4"}, 404, "model"),
    ("/tokenize", {"prompt": "x", "messages": MSG}, 400, "prompt"),
    ("/detokenize", {"tokens": [1000]}, 400, "tokens"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_request_gets_an_openai_shaped_4xx(server: str, path: str, body: dict, status: int,
                                               param: str) -> None:
    r = httpx.post(f"{server}{path}", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert err["param"] == param, err
    assert err["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    assert 0 < len(err["message"]) <= 1100


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b"null", b'{"prompt": "x", "n": 1.5}'])
def test_malformed_bodies_are_400(server: str, raw: bytes) -> None:
    r = httpx.post(f"{server}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400


def test_unknown_routes_and_methods_are_openai_shaped(server: str) -> None:
    r = httpx.get(f"{server}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    r = httpx.get(f"{server}/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


def test_unknown_fields_are_ignored_and_user_is_accepted(server: str) -> None:
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "max_tokens": 2, "user": "u1", "zzz": 1})
    assert r.status_code == 200


def test_a_vanishing_temperature_is_greedy_not_a_dead_engine(server: str) -> None:
    body = {"prompt": "tiny temperature", "max_tokens": 8, "ignore_eos": True}
    outs = [httpx.post(f"{server}/v1/completions", json={**body, "temperature": t, "mode": m}, timeout=30)
            for m in ("ar", "diffusion") for t in (0, 1e-300, 5e-324)]
    assert all(r.status_code == 200 for r in outs)
    assert len({r.json()["choices"][0]["text"] for r in outs[:3]}) == 1
    assert httpx.get(f"{server}/health").status_code == 200


def test_a_huge_prompt_is_refused_without_being_tokenized(server: str, shared_engine,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    tok = shared_engine.tokenizer  # the server's: the fixture serves this engine in a thread
    calls: list[int] = []
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, **kw: calls.append(len(text)) or real(text, **kw))
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "z" * 3_000_000}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "prompt" and "3000000 characters" in err["message"]
    assert calls == []
    assert httpx.post(f"{server}/v1/completions", json={"prompt": "zz", "max_tokens": 1}, timeout=30).status_code \
        == 200 and calls == [2]  # the probe sees real tokenization


def test_server_keeps_serving_after_the_battery(server: str) -> None:
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "still alive", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/load").json() == {"server_load": 0}
