"""Sampling controls and vLLM's request extensions through the live server (issue 20), and no field silently
ignored: every unimplemented vLLM field is a 400 naming it, a field outside the protocol a 200 and one warning.

The char tokenizer maps one character to one token (ids: 0 <unk>, 1 <s>, 2 </s> = EOS, 3 <mask>, 4 <|im_start|>,
5 <|im_end|>, then ' ', '\\n', 'a'...), so texts and token counts are easy to predict.
"""

from __future__ import annotations

import logging

import httpx
import pytest

from engine.config import MODES
from server.request_fields import CHAT, COMPLETIONS, FIELDS, readme_table
from tests.server.helpers import sse_json

EOS, IM_START = 2, 4


@pytest.fixture(scope="module")
def tid(server: str):
    def of(ch: str) -> int:
        ids = httpx.post(f"{server}/tokenize", json={"prompt": ch, "add_special_tokens": False}).json()["tokens"]
        assert len(ids) == 1
        return ids[0]
    return of


def _complete(client, model, **kw):
    extra = {k: kw.pop(k) for k in list(kw) if k not in ("prompt", "max_tokens", "temperature", "logit_bias",
                                                         "seed", "stream", "logprobs", "echo")}
    return client.completions.create(model=model, prompt=kw.pop("prompt", "Hello"), extra_body=extra, **kw)


# ---- sampling controls in every mode ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_100_makes_every_token_that_token(client, model, tid, mode, temperature):
    out = _complete(client, model, max_tokens=6, temperature=temperature, seed=1,
                    logit_bias={str(tid("q")): 100}, mode=mode, ignore_eos=True)
    assert out.choices[0].text == "q" * 6


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_holds_eos_back(client, model, mode, temperature):
    out = _complete(client, model, max_tokens=16, temperature=temperature, seed=2, logit_bias={str(EOS): 100},
                    mode=mode, min_tokens=4)
    c = out.choices[0]
    assert c.finish_reason == "stop" and out.usage.completion_tokens >= 5 and len(c.text) >= 4
    if mode != "diffusion":  # ar / self_spec / auto: EOS comes exactly when allowed
        assert out.usage.completion_tokens == 5
    early = _complete(client, model, max_tokens=16, temperature=temperature, logit_bias={str(EOS): 100}, mode=mode)
    assert early.usage.completion_tokens == 1 and early.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("penalty", [{"presence_penalty": 2.0}, {"frequency_penalty": 1.5},
                                     {"repetition_penalty": 4.0}])
def test_each_penalty_changes_greedy_output_and_self_spec_still_equals_ar(client, model, penalty):
    plain = _complete(client, model, max_tokens=12, temperature=0, mode="ar", ignore_eos=True).choices[0].text
    texts = {mode: _complete(client, model, max_tokens=12, temperature=0, mode=mode, ignore_eos=True,
                             **penalty).choices[0].text for mode in ("ar", "self_spec", "auto")}
    assert texts["ar"] != plain
    assert texts["self_spec"] == texts["ar"] == texts["auto"]
    # every penalty discourages repeats: the penalised text repeats characters no more than the plain one
    assert len(set(texts["ar"])) >= len(set(plain))


@pytest.mark.parametrize("mode", MODES)
def test_allowed_token_ids_and_bad_words_hold(client, model, tid, mode):
    allowed = [tid(c) for c in "xyz"]
    out = _complete(client, model, max_tokens=8, temperature=1.0, seed=3, mode=mode, ignore_eos=True,
                    allowed_token_ids=allowed)
    assert set(out.choices[0].text) <= set("xyz")
    # "a" is certain but for the bad word "aa": "b" (the next most likely) follows every "a"
    out = _complete(client, model, max_tokens=8, temperature=0, mode=mode, ignore_eos=True, bad_words=["aa"],
                    logit_bias={str(tid("a")): 100, str(tid("b")): 70})
    assert out.choices[0].text == "ab" * 4


@pytest.mark.parametrize("body,param", [
    ({"stop_token_ids": [96]}, "stop_token_ids"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"allowed_token_ids": [5, 1000]}, "allowed_token_ids"), ({"logit_bias": {"5000": 1}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": "big"}}, "logit_bias"), ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": 5e-324}, "repetition_penalty"),
    ({"min_p": 2}, "min_p"), ({"bad_words": [" "]}, "bad_words"),
])
def test_bad_control_values_are_400_naming_the_field(server, body, param):
    """As vLLM's own validation tests: the message names what is wrong (ids with the vocabulary size, every bad
    key), and the last id of the vocabulary is fine."""
    for path, base in (("completions", {"prompt": "Hi"}), ("chat/completions",
                                                            {"messages": [{"role": "user", "content": "Hi"}]})):
        r = httpx.post(f"{server}/v1/{path}", json={**base, "max_tokens": 4, **body})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["param"] == param


# ---- no field silently ignored ------------------------------------------------------------------------------------
def _asking(status) -> object:
    off = status.off
    if isinstance(off, bool):
        return not off
    if isinstance(off, (int, float)):
        return off + 1
    return "x"


@pytest.mark.parametrize("endpoint,name", [(e, n) for e in (COMPLETIONS, CHAT) for n, s in FIELDS[e].items()
                                           if not s.implemented])
def test_every_unimplemented_vllm_field_is_a_400_naming_it(server, endpoint, name):
    status = FIELDS[endpoint][name]
    base = {"prompt": "Hi"} if endpoint == COMPLETIONS else {"messages": [{"role": "user", "content": "Hi"}]}
    path = "completions" if endpoint == COMPLETIONS else "chat/completions"
    r = httpx.post(f"{server}/v1/{path}", json={**base, "max_tokens": 2, name: _asking(status)})
    assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
    if status.off is not None:  # its "off" value asks for nothing and is accepted
        r = httpx.post(f"{server}/v1/{path}", json={**base, "max_tokens": 2, name: status.off})
        assert r.status_code == 200, r.text


def test_a_field_outside_the_protocol_is_ignored_with_one_warning(server, caplog):
    caplog.set_level(logging.WARNING, logger="trimode.server")
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "frobnicate": 1,
                                                     "zzz_extra": {"a": 1}})
    assert r.status_code == 200
    lines = [rec.getMessage() for rec in caplog.records if "ignored" in rec.getMessage()]
    assert len(lines) == 1 and "frobnicate" in lines[0] and "zzz_extra" in lines[0]


def test_the_readme_lists_every_field_of_the_registry():
    readme = open("README.md").read()
    assert readme_table() in readme


@pytest.mark.parametrize("body", [{}, {"model": ""}, {"model": None}])
def test_model_omitted_or_empty_serves_the_model(server, body):
    for path, base in (("completions", {"prompt": "Hi"}), ("chat/completions",
                                                            {"messages": [{"role": "user", "content": "Hi"}]})):
        assert httpx.post(f"{server}/v1/{path}", json={**base, "max_tokens": 2, **body}).status_code == 200


def test_response_format_text_is_no_constraint(client, model):
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                         temperature=0, response_format={"type": "text"})
    plain = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                           temperature=0)
    assert out.choices[0].message.content == plain.choices[0].message.content


# ---- vLLM extensions ---------------------------------------------------------------------------------------------
def test_prompt_logprobs_field_on_both_endpoints(server):
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "prompt_logprobs": 2}).json()
    pl = r["choices"][0]["prompt_logprobs"]
    assert len(pl) == 5 and pl[0] is None
    for entry in pl[1:]:
        assert 2 <= len(entry) <= 3 and all({"logprob", "rank", "decoded_token"} <= set(v) for v in entry.values())
        assert sorted(v["rank"] for v in entry.values())[:2] == [1, 2]
    assert r["choices"][0]["logprobs"] is None  # the output's logprobs were not asked for
    chat = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                             "max_tokens": 2, "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and all(len(e) == 1 for e in chat["prompt_logprobs"][1:])
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "prompt_logprobs": 1,
                                                     "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


def test_return_token_ids_whole_and_streamed(server):
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    whole = httpx.post(f"{server}/v1/completions", json=body).json()["choices"][0]
    prompt_ids = httpx.post(f"{server}/tokenize", json={"prompt": "Hello"}).json()["tokens"]
    assert whole["prompt_token_ids"] == prompt_ids and len(whole["token_ids"]) == 6
    detok = httpx.post(f"{server}/detokenize", json={"tokens": whole["token_ids"]}).json()["prompt"]
    assert detok == whole["text"]
    chunks = sse_json(httpx.post(f"{server}/v1/completions", json={**body, "stream": True}).content)
    streamed = [t for c in chunks for ch in c["choices"] for t in ch["token_ids"]]
    assert streamed == whole["token_ids"] and chunks[0]["choices"][0]["prompt_token_ids"] == prompt_ids
    chat = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                             "max_tokens": 3, "return_token_ids": True}).json()
    assert len(chat["choices"][0]["token_ids"]) == chat["usage"]["completion_tokens"]
    assert len(chat["prompt_token_ids"]) == chat["usage"]["prompt_tokens"]


def test_return_tokens_as_token_ids(client, model):
    out = _complete(client, model, max_tokens=3, temperature=0, logprobs=1, ignore_eos=True,
                    return_tokens_as_token_ids=True, return_token_ids=True)
    c = out.choices[0]
    assert c.logprobs.tokens == [f"token_id:{t}" for t in c.model_extra["token_ids"]]
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          logprobs=True, extra_body={"return_tokens_as_token_ids": True})
    assert all(e.token.startswith("token_id:") for e in chat.choices[0].logprobs.content)


def test_truncate_prompt_tokens_keeps_the_last_tokens(client, model):
    out = _complete(client, model, prompt="Hello world", max_tokens=2, truncate_prompt_tokens=3, echo=True)
    assert out.usage.prompt_tokens == 3 and out.choices[0].text.startswith("rld")
    ids = list(range(10, 18))
    for side, kept in (("left", ids[-4:]), ("right", ids[:4])):
        out = _complete(client, model, prompt=ids, max_tokens=1, truncate_prompt_tokens=4, truncation_side=side,
                        return_token_ids=True)
        assert out.choices[0].model_extra["prompt_token_ids"] == kept


def test_special_tokens_in_the_text_when_not_skipped(client, model):
    bias = {str(IM_START): 100}
    kept = _complete(client, model, max_tokens=2, temperature=0, logit_bias=bias, ignore_eos=True,
                     skip_special_tokens=False)
    assert kept.choices[0].text == "<|im_start|> <|im_start|>"
    tight = _complete(client, model, max_tokens=2, temperature=0, logit_bias=bias, ignore_eos=True,
                      skip_special_tokens=False, spaces_between_special_tokens=False)
    assert tight.choices[0].text == "<|im_start|><|im_start|>"
    assert _complete(client, model, max_tokens=2, temperature=0, logit_bias=bias,
                     ignore_eos=True).choices[0].text == ""


def test_chat_echo_continue_final_message_and_generation_prompt(server, client, model):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure"}]
    out = client.chat.completions.create(model=model, messages=msgs, max_tokens=3, temperature=0,
                                         extra_body={"echo": True, "continue_final_message": True,
                                                     "add_generation_prompt": False, "ignore_eos": True})
    assert out.choices[0].message.content.startswith("Sure") and len(out.choices[0].message.content) == 7
    # the prompt ends inside the assistant's message: no <|im_end|> after "Sure"
    cont = httpx.post(f"{server}/v1/chat/completions", json={"messages": msgs, "max_tokens": 1,
                                                             "continue_final_message": True,
                                                             "add_generation_prompt": False,
                                                             "return_token_ids": True}).json()
    assert cont["prompt_token_ids"][-4:] == httpx.post(f"{server}/tokenize", json={
        "prompt": "Sure", "add_special_tokens": False}).json()["tokens"]
    no_gen = httpx.post(f"{server}/v1/chat/completions", json={"messages": msgs[:1], "max_tokens": 1,
                                                               "add_generation_prompt": False}).json()
    gen = httpx.post(f"{server}/v1/chat/completions", json={"messages": msgs[:1], "max_tokens": 1}).json()
    assert gen["usage"]["prompt_tokens"] - no_gen["usage"]["prompt_tokens"] == 11  # <|im_start|>assistant\n
    plain = client.chat.completions.create(model=model, messages=msgs[:1], max_tokens=2, extra_body={"echo": True})
    assert not plain.choices[0].message.content.startswith("Hi")  # the last message is the user's: no echo
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": msgs, "continue_final_message": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def test_chat_template_kwargs_reach_the_template(server, shared_engine, monkeypatch):
    seen = {}
    tok = shared_engine.tokenizer
    original = tok.apply_chat_template

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(tok, "apply_chat_template", spy)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    r = httpx.post(f"{server}/v1/chat/completions", json={**body, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200 and seen["enable_thinking"] is False
    r = httpx.post(f"{server}/v1/chat/completions", json={**body, "chat_template_kwargs": {"tokenize": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


def test_content_part_arrays_in_every_role(server):
    def parts(text: str) -> list[dict]:
        return [{"type": "text", "text": text}]

    as_text = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Again"}]
    as_parts = [dict(m, content=parts(m["content"])) for m in as_text]
    a, b = (httpx.post(f"{server}/v1/chat/completions", json={"messages": m, "max_tokens": 2, "temperature": 0})
            for m in (as_text, as_parts))
    assert a.status_code == b.status_code == 200
    ua, ub = a.json()["usage"], b.json()["usage"]
    # the same prompt ids: the second request finds the first one's full pages in the prefix cache
    assert {k: v for k, v in ua.items() if k != "prompt_tokens_details"} == \
        {k: v for k, v in ub.items() if k != "prompt_tokens_details"}
    assert ub["prompt_tokens_details"]["cached_tokens"] >= ua["prompt_tokens_details"]["cached_tokens"]
    assert a.json()["choices"][0]["message"] == b.json()["choices"][0]["message"]


def test_token_id_errors_say_what_and_the_vocabulary_edge_is_fine(server):
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for field, value in (("stop_token_ids", [97]), ("logit_bias", {"97": 1.0})):
        r = httpx.post(f"{server}/v1/chat/completions", json={**chat, field: value})
        assert r.status_code == 400 and "97" in r.json()["error"]["message"] and "96" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/chat/completions", json={**chat, "logit_bias": {"bad1": 50.0, "bad2": 20.0}})
    assert r.status_code == 400 and "bad1" in r.text and "bad2" in r.text
    ok = httpx.post(f"{server}/v1/chat/completions", json={**chat, "stop_token_ids": [95], "logit_bias": {"95": 1}})
    assert ok.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_wait_for_min_tokens(server, tid, stream):
    """As vLLM: a stop string in the first min_tokens tokens' text does not end the choice."""
    body = {"prompt": "Hi", "max_tokens": 8, "temperature": 0, "stop": ["a"], "logit_bias": {str(tid("a")): 100},
            "ignore_eos": True, "stream": stream}
    for min_tokens, text in ((0, ""), (3, "aaa")):
        r = httpx.post(f"{server}/v1/completions", json={**body, "min_tokens": min_tokens})
        if stream:
            chunks = sse_json(r.content)
            got = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            reason = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
        else:
            got, reason = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
        assert got == text and reason == "stop"
