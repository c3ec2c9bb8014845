"""Structured outputs through the openai client, in every mode at T = 0 and T = 1: the tiny random checkpoint writes
garbage, so whatever finishes with `stop` obeys its grammar only because the grammar held. Schemas are built to
end within max_tokens (enums, bounded strings): every output must finish with `stop` and validate."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from engine.config import MODES

SCHEMA = {
    "type": "object",
    "properties": {"mood": {"enum": ["happy", "sad"]}, "name": {"type": "string", "maxLength": 6},
                   "ok": {"type": "boolean"}},
    "required": ["mood", "name", "ok"],
    "additionalProperties": False,
}
CHAT = [{"role": "user", "content": "Describe yourself"}]
REGEX = r"[a-c]{3}-[0-9]{2}"
CHOICES = ["yes", "no", "maybe so"]
EBNF = 'root ::= "x=" digit digit? ";"\ndigit ::= [0-9]'


def _seed(temperature: float) -> int | None:
    return 7 if temperature else None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("mode", MODES)
def test_json_schema_validates_in_every_mode(client: openai.OpenAI, model: str, mode: str,
                                                  temperature: float) -> None:
    r = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=64, temperature=temperature, seed=_seed(temperature),
        response_format={"type": "json_schema", "json_schema": {"name": "m", "schema": SCHEMA}},
        extra_body={"mode": mode})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("mode", MODES)
def test_regex_choice_and_grammar_match_in_every_mode(client: openai.OpenAI, model: str, mode: str,
                                                  temperature: float) -> None:
    common = dict(model=model, prompt="Say:", max_tokens=16, temperature=temperature, seed=_seed(temperature))
    regex = client.completions.create(**common, extra_body={"mode": mode, "structured_outputs": {"regex": REGEX}})
    assert regex.choices[0].finish_reason == "stop" and re.fullmatch(REGEX, regex.choices[0].text)
    choice = client.completions.create(**common, extra_body={"mode": mode, "guided_choice": CHOICES})
    assert choice.choices[0].finish_reason == "stop" and choice.choices[0].text in CHOICES
    grammar = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=16, temperature=temperature, seed=_seed(temperature),
        extra_body={"mode": mode, "structured_outputs": {"grammar": EBNF}})
    text = grammar.choices[0].message.content
    assert grammar.choices[0].finish_reason == "stop" and re.fullmatch(r"x=[0-9]{1,2};", text), text


@pytest.mark.parametrize("mode", ["self_spec", "auto"])
def test_greedy_constrained_self_spec_equals_ar(client: openai.OpenAI, model: str, mode: str) -> None:
    """The grammar masks each verify row after the drafts before it, so the greedy output is ar's token for token,
    whatever the drafts and however many are kept (also with threshold drafting, whose drafts get cut)."""
    def run(m: str, **extra: object) -> str:
        r = client.completions.create(model=model, prompt="Well, ", max_tokens=48, temperature=0,
                                      extra_body={"mode": m, "guided_json": SCHEMA, **extra})
        return r.choices[0].text

    ar = run("ar")
    jsonschema.validate(json.loads(ar), SCHEMA)
    assert run(mode) == ar
    assert run(mode, block_length=4) == ar
    if mode == "self_spec":
        assert run(mode, threshold=0.3) == ar


def test_json_object_and_streaming(client: openai.OpenAI, model: str) -> None:
    """json_object: any JSON object; a stopped output parses, streamed or whole (the same text: greedy)."""
    args = dict(model=model, messages=CHAT, max_tokens=40, temperature=0, response_format={"type": "json_object"})
    whole = client.chat.completions.create(**args).choices[0]
    parts = list(client.chat.completions.create(**args, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    assert text == whole.message.content
    assert text.lstrip().startswith("{")
    if whole.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_response_format_text_is_no_constraint(client: openai.OpenAI, model: str) -> None:
    args = dict(model=model, prompt="Hello", max_tokens=8, temperature=0)
    plain = client.completions.create(**args).choices[0].text
    assert client.completions.create(**args, extra_body={"response_format": {"type": "text"}}).choices[0].text == plain


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"whatever": "a"}}, "structured_outputs"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
])
@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_invalid_constraint_is_400_naming_the_field(server: str, body: dict, param: str, endpoint: str) -> None:
    base = {"prompt": "Hi"} if endpoint == "completions" else {"messages": CHAT}
    r = httpx.post(f"{server}/v1/{endpoint}", json={**base, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_compiled_grammars_are_cached(ckpt) -> None:
    """The same spec twice compiles once (the server's LRU is keyed by the spec, wherever the field came from)."""
    import asyncio

    from engine.structured import GrammarSpec
    from engine.tokenizer import load_tokenizer
    from server.structured_outputs import StructuredOutputs

    so = StructuredOutputs(load_tokenizer(ckpt), 96, max_entries=2)
    a = asyncio.run(so.compiled(GrammarSpec("regex", "ab+", "guided_regex")))
    b = asyncio.run(so.compiled(GrammarSpec("regex", "ab+", "structured_outputs")))
    assert a.compiled == b.compiled and so.compiler.misses == 1
    for pattern in ("c", "d", "e"):  # the LRU keeps max_entries
        asyncio.run(so.compiled(GrammarSpec("regex", pattern)))
    assert len(so.compiler._cache) == 2 and len(so._serialized) == 2


def test_grammar_crosses_the_process_boundary(shared_engine, ckpt) -> None:
    """The engine process receives SamplingParams pickled (server.engine_process's pipe): the spec carries the
    server's serialized compile, which the engine deserializes instead of compiling, with the same output."""
    import asyncio
    import pickle

    from engine.grammar import _CACHES
    from engine.sequence import SamplingParams
    from engine.structured import GrammarSpec
    from server.structured_outputs import StructuredOutputs

    so = StructuredOutputs(shared_engine.tokenizer, shared_engine.model_config.vocab_size)
    spec = asyncio.run(so.compiled(GrammarSpec("json", json.dumps(SCHEMA), "guided_json")))
    assert spec.compiled
    prompt = shared_engine.tokenizer.encode("Well, ")
    outs = []
    for i, s in enumerate((spec, GrammarSpec(spec.kind, spec.source, spec.field))):  # shipped, then compiled here
        _CACHES.clear()  # the engine's grammars: deserialized (first) or compiled (second) afresh
        params = pickle.loads(pickle.dumps(SamplingParams(max_tokens=48, mode="self_spec", structured=s)))
        assert params.structured.compiled == s.compiled
        shared_engine.add_request(f"boundary-{i}", prompt, params)
        tokens, reason = [], None
        while shared_engine.has_unfinished():
            for out in shared_engine.step():
                tokens += out.new_token_ids
                reason = out.finish_reason or reason
        assert reason == "stop"
        outs.append(shared_engine.tokenizer.decode(tokens, skip_special_tokens=True))
    jsonschema.validate(json.loads(outs[0]), SCHEMA)
    assert outs[0] == outs[1]


def test_ignore_eos_does_not_run_past_the_grammar(client: openai.OpenAI, model: str) -> None:
    """Past a complete choice only EOS is allowed: the request stops there even under ignore_eos."""
    r = client.completions.create(model=model, prompt="Say:", max_tokens=16, temperature=1.0, seed=1,
                                  extra_body={"guided_choice": CHOICES, "ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text in CHOICES
