"""Behaviours that vLLM's own tests/entrypoints/openai tests check, over the live server: zero logprobs on both
endpoints, chat usage chunks (include_usage, continuous_usage_stats), extra fields inside a message,
max_completion_tokens, malformed structured-output fields, finite logprobs under a grammar, a null tool_choice,
no-argument tool calls in the history, and out-of-range cache_salt / prompt_logprobs / token-id prompts."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

from engine.config import MODES

CHAT = [{"role": "user", "content": "Hello there"}]
C, CH = "/v1/completions", "/v1/chat/completions"


def test_completions_zero_logprobs_give_the_sampled_token_only(client: openai.OpenAI, model: str) -> None:
    """logprobs=0: each token's top_logprobs holds exactly one entry, the sampled token with its logprob."""
    out = client.completions.create(model=model, prompt="Once upon", max_tokens=6, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.top_logprobs) == out.usage.completion_tokens == 6
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top == {tok: value}


def test_chat_zero_top_logprobs_are_empty_lists(client: openai.OpenAI, model: str) -> None:
    """logprobs=True, top_logprobs=0: every content item carries its own logprob and `top_logprobs == []`."""
    out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=0, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    for item in content:
        assert item.top_logprobs == [] and item.logprob <= 0


@pytest.mark.parametrize("stream_options", [None, {"include_usage": True},
                                            {"include_usage": True, "continuous_usage_stats": True}])
def test_chat_stream_usage_chunks(client: openai.OpenAI, model: str, stream_options: dict | None) -> None:
    """include_usage: a last chunk with no choices and the usage; without it no chunk has usage; with
    continuous_usage_stats every chunk has it, counting up to the final one."""
    kw = {} if stream_options is None else {"stream_options": stream_options}
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=5, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if stream_options is None:
        assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
        return
    last = chunks[-1]
    assert last.choices == [] and all(c.choices for c in chunks[:-1])
    assert last.usage.completion_tokens == 5
    assert last.usage.prompt_tokens + last.usage.completion_tokens == last.usage.total_tokens
    if not stream_options.get("continuous_usage_stats"):
        assert all(c.usage is None for c in chunks[:-1])
        return
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0
    assert all(c.usage.prompt_tokens == last.usage.prompt_tokens for c in chunks)
    assert all(c.usage.prompt_tokens + c.usage.completion_tokens == c.usage.total_tokens for c in chunks)


def test_unknown_field_inside_a_message_is_accepted(server: str) -> None:
    """A message with a field outside the protocol (beside `name`) is served, not refused."""
    msg = {"role": "user", "content": "hi", "name": "bob", "foo": 1}
    r = httpx.post(f"{server}{CH}", json={"messages": [msg], "max_tokens": 3, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_max_completion_tokens_limits_the_output(client: openai.OpenAI, model: str) -> None:
    """max_completion_tokens=3 under ignore_eos: exactly three tokens, finished by length."""
    out = client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=3, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


@pytest.mark.parametrize(("body", "param"), [
    ({"structured_outputs": "regex"}, "structured_outputs"),
    ({"structured_outputs": ["yes", "no"]}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
])
def test_malformed_structured_output_field_is_400_naming_it(server: str, body: dict, param: str) -> None:
    """structured_outputs that is no object, a json_schema response_format without a schema: 400 naming the field."""
    r = httpx.post(f"{server}{CH}", json={"messages": CHAT, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("mode", MODES)
def test_logprobs_under_a_choice_constraint_are_finite(client: openai.OpenAI, model: str, mode: str) -> None:
    """Under a grammar the sampled token's and the top alternatives' logprobs are finite (never -inf for the
    tokens the grammar masks)."""
    out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0, logprobs=True,
                                         top_logprobs=5, extra_body={"mode": mode, "structured_outputs": {
                                             "choice": ["yes", "no", "maybe so"]}})
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content in ("yes", "no", "maybe so")
    content = choice.logprobs.content
    assert content
    values = [v for item in content for v in (item.logprob, *(t.logprob for t in item.top_logprobs))]
    assert all(len(item.top_logprobs) == 5 for item in content)
    assert all(math.isfinite(v) and -9999.0 <= v <= 0 for v in values), values


def test_null_tool_choice_is_auto(client: openai.OpenAI, model: str) -> None:
    """tool_choice null with tools: the request of one that omits it (auto), the same greedy reply."""
    tools = [{"type": "function", "function": {"name": "ping", "description": "ping",
                                               "parameters": {"type": "object", "properties": {}}}}]
    kw = dict(model=model, messages=CHAT, tools=tools, max_tokens=12, temperature=0)
    raw = client.chat.completions.with_raw_response.create(tool_choice=None, **kw)
    assert json.loads(raw.http_request.content)["tool_choice"] is None  # sent as JSON null
    null, absent = raw.parse().choices[0], client.chat.completions.create(**kw).choices[0]
    assert (null.message.content, null.message.tool_calls, null.finish_reason) == \
        (absent.message.content, absent.message.tool_calls, absent.finish_reason)


@pytest.mark.parametrize("arguments", ["", "{}"])
def test_no_argument_tool_call_in_the_history_is_accepted(client: openai.OpenAI, model: str, arguments: str) -> None:
    """An assistant call of a function without parameters (arguments "" or "{}") and its result: a reply."""
    tools = [{"type": "function", "function": {"name": "now", "description": "the time",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "What time is it?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_0", "type": "function", "function": {"name": "now", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "call_0", "content": "12:00"}]
    out = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=4, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 4


@pytest.mark.parametrize(("path", "body", "param"), [
    (CH, {"messages": CHAT, "cache_salt": ""}, "cache_salt"),
    (C, {"prompt": "x", "cache_salt": ""}, "cache_salt"),
    (C, {"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
    (CH, {"messages": CHAT, "prompt_logprobs": -1}, "prompt_logprobs"),
    (C, {"prompt": [[-1]]}, "prompt"),
])
def test_out_of_range_fields_are_400_naming_them(server: str, path: str, body: dict, param: str) -> None:
    """An empty cache_salt, a negative prompt_logprobs, a nested token-id prompt with a negative id: 400."""
    r = httpx.post(f"{server}{path}", json={"max_tokens": 2, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and err["type"] == "BadRequestError" and err["param"] == param, err
