"""The live server over the official openai client and raw httpx: both endpoints, streaming or not, every mode."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from engine.config import MODES
from tests.server.helpers import sse_events, sse_json

CHAT = [{"role": "user", "content": "Hello there"}]


def test_models_lists_the_checkpoint_with_its_context_length(server: str) -> None:
    body = httpx.get(f"{server}/v1/models").json()
    assert body["object"] == "list"
    card = body["data"][0]
    assert card["object"] == "model" and card["max_model_len"] == 512 and card["id"] == card["root"]


def test_retrieve_model_by_id(client: openai.OpenAI, model: str, server: str) -> None:
    assert client.models.retrieve(model).id == model
    r = httpx.get(f"{server}/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_health_ready_version_load(server: str) -> None:
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/ready").json() == {"status": "ready"}
    assert httpx.get(f"{server}/version").json()["version"]
    assert httpx.get(f"{server}/load").json() == {"server_load": 0}


def test_tokenize_and_detokenize_round_trip(server: str) -> None:
    toks = httpx.post(f"{server}/tokenize", json={"prompt": "Hi there"}).json()
    assert toks["count"] == len(toks["tokens"]) == 8 and toks["max_model_len"] == 512
    assert httpx.post(f"{server}/detokenize", json={"tokens": toks["tokens"]}).json() == {"prompt": "Hi there"}
    chat = httpx.post(f"{server}/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > toks["count"]


@pytest.mark.parametrize("mode", MODES)
def test_completion_in_every_mode(client: openai.OpenAI, model: str, mode: str) -> None:
    out = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0,
                                    extra_body={"mode": mode, "ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == len("Once upon a time")
    assert out.model_extra["mode"] == mode


@pytest.mark.parametrize("mode", MODES)
def test_streamed_completion_equals_the_non_streamed_one(client: openai.OpenAI, model: str, mode: str) -> None:
    kw = dict(model=model, prompt="The cat", max_tokens=16, temperature=0, extra_body={"mode": mode})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


@pytest.mark.parametrize("mode", MODES)
def test_chat_in_every_mode_streaming_and_not(client: openai.OpenAI, model: str, mode: str) -> None:
    kw = dict(model=model, messages=CHAT, max_tokens=10, temperature=0, extra_body={"mode": mode})
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.role == "assistant" and whole.model_extra["mode"] == mode
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


@pytest.mark.parametrize("block_length", [4, 8, 16])
def test_greedy_self_spec_returns_exactly_the_text_of_greedy_ar(client: openai.OpenAI, model: str,
                                                               block_length: int) -> None:
    def run(mode: str) -> str:
        out = client.completions.create(model=model, prompt=["A story", "Zebra 42"], max_tokens=40, temperature=0,
                                        extra_body={"mode": mode, "block_length": block_length})
        return "|".join(c.text for c in out.choices)

    assert run("self_spec") == run("ar")
    chat = [client.chat.completions.create(model=model, messages=CHAT, max_tokens=30, temperature=0,
                                           extra_body={"mode": m, "block_length": block_length})
            for m in ("ar", "self_spec")]
    assert chat[0].choices[0].message.content == chat[1].choices[0].message.content


def test_n_choices_and_prompt_lists(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt=["ab", "cd"], n=3, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == list(range(6))
    assert out.usage.completion_tokens == 30 and out.usage.prompt_tokens == 4
    assert len({c.text for c in out.choices[:3]}) == 1  # greedy: identical choices
    streamed = client.chat.completions.create(model=model, messages=CHAT, n=2, max_tokens=6, stream=True,
                                              temperature=0.8, seed=7, extra_body={"mode": "diffusion"})
    roles = [c.choices[0].index for c in streamed if c.choices and c.choices[0].delta.role]
    assert sorted(roles) == [0, 1]


def test_token_id_prompts_and_echo(client: openai.OpenAI, model: str, server: str) -> None:
    ids = httpx.post(f"{server}/tokenize", json={"prompt": "Echo me"}).json()["tokens"]
    a = client.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0)
    b = client.completions.create(model=model, prompt=[ids, ids], max_tokens=6, temperature=0)
    c = client.completions.create(model=model, prompt="Echo me", max_tokens=6, temperature=0, echo=True)
    assert a.choices[0].text == b.choices[1].text
    assert c.choices[0].text == "Echo me" + a.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text_and_is_reported(client: openai.OpenAI, model: str, stream: bool) -> None:
    kw = dict(model=model, prompt="Stop here", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    assert len(full) >= 12, full
    stop = full[6:9]
    cut = full[:full.index(stop)]
    if stream:
        chunks = list(client.completions.create(stream=True, stop=[stop, "\x00never"], **kw))
        text = "".join(c.choices[0].text for c in chunks)
        last = chunks[-1].choices[0]
        reason, stop_reason = last.finish_reason, last.model_extra["stop_reason"]
    else:
        out = client.completions.create(stop=stop, **kw).choices[0]
        text, reason, stop_reason = out.text, out.finish_reason, out.model_extra["stop_reason"]
    assert (text, reason, stop_reason) == (cut, "stop", stop)


def test_completion_sse_bytes_are_framed_exactly(server: str) -> None:
    body = {"prompt": "Frame", "max_tokens": 6, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    raw = httpx.post(f"{server}/v1/completions", json=body, timeout=30)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw.content)
    chunks = [json.loads(e) for e in events[:-1]]
    for e, c in zip(events, chunks):
        assert e == json.dumps(c, separators=(",", ":"), ensure_ascii=False)  # compact, nothing dropped
    first = chunks[0]
    assert list(first) == ["id", "object", "created", "model", "choices", "mode"]
    assert list(first["choices"][0]) == ["index", "text", "logprobs", "finish_reason", "stop_reason"]
    assert first["object"] == "text_completion" and first["id"].startswith("cmpl-")
    assert all(c["id"] == first["id"] and c["created"] == first["created"] for c in chunks)
    assert all(c["choices"][0]["text"] for c in chunks[:-1])  # no empty chunks
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    usage = chunks[-1]
    assert list(usage) == ["id", "object", "created", "model", "choices", "usage", "mode"]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 6,
                                                         "total_tokens": 11,
                                                         "prompt_tokens_details": {"cached_tokens": 0}}
    head = (f'data: {{"id":"{first["id"]}","object":"text_completion","created":{first["created"]},'
            f'"model":"{first["model"]}","choices":[{{"index":0,"text":').encode()
    assert raw.content.startswith(head)
    assert raw.content.endswith(b',"mode":"ar"}\n\ndata: [DONE]\n\n')


def test_chat_sse_bytes_start_with_the_role_chunk(server: str) -> None:
    body = {"messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True, "mode": "self_spec"}
    raw = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30).content
    chunks = sse_json(raw)
    c0 = chunks[0]
    role = (f'data: {{"id":"{c0["id"]}","object":"chat.completion.chunk","created":{c0["created"]},'
            f'"model":"{c0["model"]}","choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},'
            f'"logprobs":null,"finish_reason":null}}],"mode":"self_spec"}}\n\n').encode()
    assert raw.startswith(role)
    for c in chunks[1:-1]:
        assert list(c["choices"][0]) == ["index", "delta", "logprobs", "finish_reason"]
        assert c["choices"][0]["delta"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "usage" not in chunks[-1]


def test_continuous_usage_stats_puts_usage_in_every_chunk(server: str) -> None:
    body = {"prompt": "usage", "max_tokens": 5, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = sse_json(httpx.post(f"{server}/v1/completions", json=body, timeout=30).content)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 5 and all(c["usage"]["prompt_tokens"] == 5 for c in chunks)


def test_stream_options_without_stream_is_400(server: str) -> None:
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_null_max_tokens_fills_the_context(client: openai.OpenAI, model: str, server: str) -> None:
    r = httpx.post(f"{server}/v1/completions", timeout=60, json={"prompt": "null", "max_tokens": None,
                                                                 "ignore_eos": True, "temperature": 0})
    assert r.json()["usage"]["total_tokens"] == 512

    out = client.chat.completions.create(model=model, messages=CHAT, temperature=0,
                                         extra_body={"ignore_eos": True, "mode": "diffusion", "block_length": 16})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens <= 512 and out.usage.completion_tokens > 400


@pytest.mark.parametrize("mode", ["ar", "self_spec"])
def test_chat_without_max_tokens_fills_the_context(client: openai.OpenAI, model: str, mode: str) -> None:
    out = client.chat.completions.create(model=model, messages=CHAT, temperature=0,
                                         extra_body={"ignore_eos": True, "mode": mode})
    assert out.choices[0].finish_reason == "length" and out.usage.total_tokens == 512
