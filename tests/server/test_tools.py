"""Tool calling through the openai client: named and required choices are enforced by grammar in every mode at
T = 0 and T = 1 (the tiny random checkpoint calls tools only because the grammar makes it), auto choice parses
Hermes calls (the output forced into one with a regex), whole and streamed, with OpenAI's delta shape; tool and
assistant tool_calls messages are accepted; bad tool fields are 400s naming them."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from engine.config import MODES
from server.tools import ToolOutput, plan

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "metric": {"type": "boolean"}},
           "required": ["city", "metric"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "the weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "clock", "description": "the time", "parameters": TIME}}]
SCHEMAS = {"weather": WEATHER, "clock": TIME}
CHAT = [{"role": "user", "content": "Weather in Paris?"}]
HERMES = (r'<tool_call>\{"name": "weather", "arguments": \{"city": "(Paris|Rome)", "metric": (true|false)\}\}'
          r'</tool_call>')


def _streamed_calls(chunks: list) -> tuple[dict[int, dict], list[str]]:
    """Reassemble streamed tool calls by index, checking OpenAI's shape (first delta of a call: id, type, name and
    empty arguments; later ones: argument fragments only); also the finish reasons seen."""
    calls: dict[int, dict] = {}
    reasons = []
    for c in chunks:
        if not c.choices:
            continue
        ch = c.choices[0]
        if ch.finish_reason:
            reasons.append(ch.finish_reason)
        for d in ch.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function.name and d.function.arguments == ""
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
    return calls, reasons


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("mode", MODES)
def test_named_tool_choice_whole_and_streamed(client: openai.OpenAI, model: str, mode: str,
                                              temperature: float) -> None:
    args = dict(model=model, messages=CHAT, tools=TOOLS, max_tokens=64, temperature=temperature, seed=3,
                tool_choice={"type": "function", "function": {"name": "weather"}}, extra_body={"mode": mode})
    whole = client.chat.completions.create(**args).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    (call,) = whole.message.tool_calls
    assert call.type == "function" and call.function.name == "weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    calls, reasons = _streamed_calls(list(client.chat.completions.create(**args, stream=True)))
    assert reasons == ["tool_calls"] and list(calls) == [0] and calls[0]["name"] == "weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)
    if temperature == 0:
        assert calls[0]["arguments"] == call.function.arguments


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("mode", MODES)
def test_required_tool_choice_makes_one_valid_call(client: openai.OpenAI, model: str, mode: str,
                                                   temperature: float) -> None:
    r = client.chat.completions.create(model=model, messages=CHAT, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=96, temperature=temperature, seed=5,
                                       extra_body={"mode": mode})
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch.message
    (call,) = ch.message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_tool_choice_streamed(client: openai.OpenAI, model: str) -> None:
    args = dict(model=model, messages=CHAT, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                max_tokens=96, temperature=0)
    whole = client.chat.completions.create(**args).choices[0].message.tool_calls
    calls, reasons = _streamed_calls(list(client.chat.completions.create(**args, stream=True)))
    assert reasons == ["tool_calls"]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole]


@pytest.mark.parametrize("mode", MODES)
def test_auto_tool_choice_parses_hermes_calls(client: openai.OpenAI, model: str, mode: str) -> None:
    """The output is forced into a Hermes call (a regex): auto's parser turns it into tool_calls."""
    args = dict(model=model, messages=CHAT, tools=TOOLS, max_tokens=96, temperature=0,
                extra_body={"mode": mode, "structured_outputs": {"regex": HERMES}})
    ch = client.chat.completions.create(**args).choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.function.name == "weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    chunks = list(client.chat.completions.create(**args, stream=True))
    calls, reasons = _streamed_calls(chunks)
    assert reasons == ["tool_calls"] and calls[0]["name"] == "weather"
    assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


def test_parallel_hermes_calls_are_indexed_whole_and_streamed(client: openai.OpenAI, model: str) -> None:
    """Two calls in one output (forced with a regex): two tool_calls in order, and the stream sends each under its
    own index, its id and name once."""
    two = HERMES + r"\n" + HERMES.replace("weather", "clock").replace(
        r'"city": "(Paris|Rome)", "metric": (true|false)', r'"zone": "(UTC|CET)"')
    args = dict(model=model, messages=CHAT, tools=TOOLS, max_tokens=256, temperature=0,
                extra_body={"structured_outputs": {"regex": two}})
    ch = client.chat.completions.create(**args).choices[0]
    assert ch.finish_reason == "tool_calls"
    assert [c.function.name for c in ch.message.tool_calls] == ["weather", "clock"]
    assert len({c.id for c in ch.message.tool_calls}) == 2
    calls, reasons = _streamed_calls(list(client.chat.completions.create(**args, stream=True)))
    assert reasons == ["tool_calls"] and sorted(calls) == [0, 1]
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in (0, 1)] == [
        (c.function.name, json.loads(c.function.arguments)) for c in ch.message.tool_calls]


def test_auto_without_calls_is_content_and_none_parses_nothing(client: openai.OpenAI, model: str) -> None:
    plain = client.chat.completions.create(model=model, messages=CHAT, tools=TOOLS, max_tokens=12, temperature=0)
    assert plain.choices[0].finish_reason in ("stop", "length") and not plain.choices[0].message.tool_calls
    assert isinstance(plain.choices[0].message.content, str)
    none = client.chat.completions.create(model=model, messages=CHAT, tools=TOOLS, tool_choice="none",
                                          max_tokens=96, temperature=0,
                                          extra_body={"structured_outputs": {"regex": HERMES}})
    assert none.choices[0].message.content.startswith("<tool_call>") and not none.choices[0].message.tool_calls
    assert none.choices[0].finish_reason == "stop"


def test_tool_results_and_assistant_calls_are_accepted(client: openai.OpenAI, model: str) -> None:
    messages = CHAT + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather",
                                                              "arguments": '{"city": "Paris", "metric": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "weather"}}])
def test_a_forced_choice_cut_by_max_tokens_has_no_call(server: str, choice) -> None:
    """A required or named choice whose JSON did not close within max_tokens: finish `length`, empty content and
    tool_calls null (OpenAI's and vLLM's answer), not a call with cut arguments."""
    for max_tokens in (1, 5):
        r = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
            "messages": CHAT, "tools": TOOLS, "tool_choice": choice, "max_tokens": max_tokens, "temperature": 0})
        (ch,) = r.json()["choices"]
        assert ch["finish_reason"] == "length" and ch["message"]["content"] == ""
        assert ch["message"]["tool_calls"] is None


def test_a_forced_call_whose_json_closed_at_the_limit_is_still_a_call() -> None:
    """The grammar's last token can come exactly at max_tokens (finish `length`, before the stop token): the JSON
    is whole, so the call stands."""
    named = ToolOutput.for_plan(plan(TOOLS, {"type": "function", "function": {"name": "weather"}}, None), "hermes")
    required = ToolOutput.for_plan(plan(TOOLS, "required", None), "hermes")
    assert named is not None and required is not None
    args = '{"city": "Paris", "metric": true}'
    content, calls = named.final(args, "length")
    assert content is None and [c["function"]["arguments"] for c in calls] == [args]
    content, calls = required.final(f'[{{"name": "weather", "parameters": {args}}}]', "length")
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == json.loads(args)
    assert named.final(args[:-1], "length") == ("", None) == required.final('[{"name": "weath', "length")


@pytest.mark.parametrize("body,param", [
    ({"tools": []}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "weather"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
      "tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_fields_are_400_naming_them(server: str, body: dict, param: str) -> None:
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
