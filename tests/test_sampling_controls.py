"""Sampling controls (issue 20): the processors' math, and the controls in every mode through the engine.

Contracts: greedy ar under a control == a reference loop that applies the control's definition to the model's own
logits; greedy self_spec (and auto's self_spec rounds) == greedy ar under each control; logit_bias, allowed tokens,
bad words and min_tokens hold in every mode at T = 0 and T = 1.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine.decoding.modes import MODES
from engine.errors import InvalidParam
from engine.logits_processing import (
    BadWords,
    LogitBias,
    MinTokens,
    Penalties,
    build_pipeline,
    committed_prefixes,
    process,
)
from engine.sequence import SamplingParams, Sequence
from tests.checkpoints import EOS_ID, MASK_ID, VOCAB
from tests.reference import _logits
from tests.test_auto import force


def _seq(prompt: list[int], output: list[int], params: SamplingParams | None = None) -> Sequence:
    params = params or SamplingParams(max_tokens=50)
    seq = Sequence("t", prompt + output, len(prompt), params, frozenset({EOS_ID}))
    seq.logits_pipeline = build_pipeline(params, stop_ids=[EOS_ID])
    return seq


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, VOCAB) for _ in range(rng.randrange(2, 20))] for _ in range(n)]


# ---- the processors' math ---------------------------------------------------------------------------------------
def test_penalties_follow_vllm_definitions_and_count_the_row_prefix():
    seq = _seq([5, 6], [7, 7, 8])
    logits = torch.zeros(2, 10)
    logits[:, 5], logits[:, 6], logits[:, 7], logits[:, 9] = 2.0, -2.0, 1.0, 3.0
    out = Penalties(0.0, 0.0, 2.0)(logits.clone(), seq, [(), ()])
    # repetition over prompt + output: positive divided, negative multiplied; unseen tokens untouched
    assert out[0, 5] == 1.0 and out[0, 6] == -4.0 and out[0, 7] == 0.5 and out[0, 9] == 3.0
    out = Penalties(0.5, 0.25, 1.0)(logits.clone(), seq, [(), (9, 9, 7)])
    # frequency and presence over output tokens only (the prompt's 5 and 6 untouched); row 1 counts its prefix
    assert out[0, 5] == 2.0 and out[0, 6] == -2.0
    assert out[0, 7] == pytest.approx(1.0 - 0.25 * 2 - 0.5) and out[0, 8] == pytest.approx(-0.25 - 0.5)
    assert out[1, 7] == pytest.approx(1.0 - 0.25 * 3 - 0.5) and out[1, 9] == pytest.approx(3.0 - 0.25 * 2 - 0.5)
    assert out[0, 9] == 3.0


def test_bias_min_tokens_and_bad_words_act_per_row_context():
    seq = _seq([5], [4])
    logits = torch.zeros(3, 10)
    assert LogitBias([(3, 5.0), (4, -1.5)])(logits.clone(), seq, [()] * 3)[:, 3:5].tolist() == [[5.0, -1.5]] * 3
    # min_tokens 3 with one output token: rows at output positions 1, 2 hold EOS back, position 3 may stop
    out = MinTokens(3, [EOS_ID])(logits.clone(), seq, [(), (6,), (6, 6)])
    assert out[:, EOS_ID].tolist() == [float("-inf"), float("-inf"), 0.0]
    # bad word (4, 8): 8 banned where the context ends with 4; a one-token word (9) always
    out = BadWords([(4, 8), (9,)])(logits.clone(), seq, [(), (6,), (6, 4)])
    assert out[:, 8].tolist() == [float("-inf"), 0.0, float("-inf")]
    assert out[:, 9].isinf().all()


def test_committed_prefixes_stop_at_the_first_mask():
    m = MASK_ID
    block = [50, 10, m, 11, m]
    assert committed_prefixes(block, [2, 4], m) == [(10,), (10,)]
    assert committed_prefixes([50, m, 12], [1], m) == [()]


def test_a_plain_request_has_no_pipeline_and_pays_nothing():
    params = SamplingParams(temperature=0.7, top_p=0.9)
    assert build_pipeline(params, stop_ids=[EOS_ID]) is None
    seq = _seq([5], [], params)
    rows = torch.randn(2, VOCAB)
    assert process(rows, seq) is rows


@pytest.mark.parametrize("kwargs,field", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"repetition_penalty": 5e-324}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"), ({"logit_bias": ((5, 101.0),)}, "logit_bias"),
    ({"allowed_token_ids": ()}, "allowed_token_ids"), ({"bad_words_token_ids": ((),)}, "bad_words"),
])
def test_out_of_range_controls_name_their_field(kwargs, field):
    with pytest.raises(InvalidParam) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field


@pytest.mark.parametrize("kwargs,field", [
    ({"stop_token_ids": (VOCAB,)}, "stop_token_ids"), ({"stop_token_ids": (-1,)}, "stop_token_ids"),
    ({"logit_bias": ((VOCAB + 5, 1.0),)}, "logit_bias"), ({"allowed_token_ids": (4, -2)}, "allowed_token_ids"),
    ({"bad_words_token_ids": ((4, VOCAB),)}, "bad_words"),
])
def test_token_ids_outside_the_vocabulary_name_their_field(tiny_llm, kwargs, field):
    with pytest.raises(InvalidParam) as e:
        tiny_llm.engine.add_request("bad", [5, 6], SamplingParams(**kwargs))
    assert e.value.field == field


# ---- greedy equalities ---------------------------------------------------------------------------------------------
CONTROLS = {
    "presence": {"presence_penalty": 1.5},
    "frequency": {"frequency_penalty": 0.7},
    "repetition": {"repetition_penalty": 3.0},
    "bias": {"logit_bias": ((17, 6.0), (48, -4.0))},
    "bad_words": {"bad_words_token_ids": ((65,), (51, 10), (7, 7))},
    "allowed": {"allowed_token_ids": tuple(range(4, 60, 3))},
    "min_tokens": {"min_tokens": 6, "logit_bias": ((EOS_ID, 1.0),)},
}


def _reference_greedy(model, prompt: list[int], n: int, kw: dict) -> list[int]:
    """ar greedy over full recomputes with each control written out from its definition (not the engine's code)."""
    ids = list(prompt)
    for _ in range(n):
        row = _logits(model, ids, len(ids))[-1].float().clone()
        out = ids[len(prompt):]
        if "allowed_token_ids" in kw:
            keep = torch.full_like(row, float("-inf"))
            keep[list(kw["allowed_token_ids"])] = row[list(kw["allowed_token_ids"])]
            row = keep
        for w in kw.get("bad_words_token_ids", ()):
            if tuple(out[len(out) - len(w) + 1:]) == w[:-1] if len(w) > 1 else True:
                row[w[-1]] = float("-inf")
        if len(out) < kw.get("min_tokens", 0):
            row[EOS_ID] = float("-inf")
        for t, b in kw.get("logit_bias", ()):
            row[t] += b
        r = kw.get("repetition_penalty", 1.0)
        for t in set(ids):
            row[t] = row[t] / r if row[t] > 0 else row[t] * r
        for t in set(out):
            row[t] -= kw.get("frequency_penalty", 0.0) * out.count(t) + kw.get("presence_penalty", 0.0)
        row[MASK_ID] = float("-inf")
        tok = int(row.argmax())
        ids.append(tok)
        if tok == EOS_ID:
            break
    return ids[len(prompt):]


@pytest.mark.parametrize("name", list(CONTROLS))
def test_greedy_ar_under_each_control_equals_its_definition(tiny_llm, name):
    prompts = _prompts(2, seed=11)
    outs = tiny_llm.generate(prompts, SamplingParams(max_tokens=12, mode="ar", **CONTROLS[name]))
    model = tiny_llm.engine.runner.model
    for p, o in zip(prompts, outs):
        assert o.token_ids == _reference_greedy(model, p, 12, CONTROLS[name])


@pytest.mark.parametrize("name", list(CONTROLS))
def test_greedy_self_spec_and_auto_equal_greedy_ar_under_each_control(tiny_llm, monkeypatch, name):
    force(tiny_llm, monkeypatch, "alternate")
    prompts = _prompts(3, seed=12)
    ar = tiny_llm.generate(prompts, SamplingParams(max_tokens=20, mode="ar", **CONTROLS[name]))
    plain = tiny_llm.generate(prompts, SamplingParams(max_tokens=20, mode="ar"))
    if name != "min_tokens":  # the control changes the output (min_tokens only where EOS would come early)
        assert any(a.token_ids != b.token_ids for a, b in zip(ar, plain))
    for mode in ("self_spec", "auto"):
        other = tiny_llm.generate(prompts, SamplingParams(max_tokens=20, mode=mode, **CONTROLS[name]))
        assert [o.token_ids for o in other] == [a.token_ids for a in ar], mode


# ---- every mode, T = 0 and T = 1 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_100_makes_every_token_that_token(tiny_llm, mode, temperature):
    params = SamplingParams(max_tokens=10, mode=mode, temperature=temperature, seed=3, logit_bias=((33, 100.0),))
    for o in tiny_llm.generate(_prompts(2, seed=13), params):
        assert o.token_ids == [33] * 10


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_holds_eos_back(tiny_llm, mode, temperature):
    # EOS biased to be certain: it comes exactly when min_tokens lets it (diffusion: no earlier, by the block)
    params = SamplingParams(max_tokens=20, mode=mode, temperature=temperature, seed=4, min_tokens=5,
                            logit_bias=((EOS_ID, 100.0),))
    for o in tiny_llm.generate(_prompts(2, seed=14), params):
        assert EOS_ID not in o.token_ids[:5] and o.finish_reason == "stop" and o.token_ids[-1] == EOS_ID
        if mode != "diffusion":
            assert len(o.token_ids) == 6
    unheld = tiny_llm.generate(_prompts(1, seed=14), SamplingParams(max_tokens=20, mode=mode,
                                                                    logit_bias=((EOS_ID, 100.0),)))
    assert unheld[0].token_ids == [EOS_ID]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_allowed_tokens_and_bad_words_hold(tiny_llm, mode, temperature):
    allowed = (20, 21, 22)
    params = SamplingParams(max_tokens=12, mode=mode, temperature=temperature, seed=5, allowed_token_ids=allowed)
    for o in tiny_llm.generate(_prompts(2, seed=15), params):
        assert set(o.token_ids) <= set(allowed)
    # 50 is certain but for the bad word (50, 50): after 50 comes 51 (the next most likely: the tiny model's logits
    # span about 22), then 50 again
    params = SamplingParams(max_tokens=12, mode=mode, temperature=temperature, seed=6,
                            logit_bias=((50, 100.0), (51, 70.0)), bad_words_token_ids=((50, 50), (52,)))
    for o in tiny_llm.generate(_prompts(2, seed=16), params):
        assert o.token_ids == [50, 51] * 6


@pytest.mark.parametrize("mode", MODES)
def test_penalties_change_sampled_output_in_every_mode(tiny_llm, mode):
    """At T = 1 with a seed, a strong repetition penalty and presence penalty change the output, and the
    frequency penalty stops a biased token from repeating."""
    prompts = _prompts(2, seed=17)
    base = SamplingParams(max_tokens=12, mode=mode, temperature=1.0, seed=7, logit_bias=((44, 5.0),))
    plain = tiny_llm.generate(prompts, base)
    assert any(o.token_ids.count(44) > 1 for o in plain)  # the bias makes 44 repeat
    penal = tiny_llm.generate(prompts, SamplingParams(max_tokens=12, mode=mode, temperature=1.0, seed=7,
                                                      logit_bias=((44, 5.0),), frequency_penalty=2.0,
                                                      presence_penalty=2.0, repetition_penalty=3.0))
    for o in penal:
        assert o.token_ids.count(44) <= 2


@pytest.mark.parametrize("kwargs", [{"allowed_token_ids": (EOS_ID,), "min_tokens": 2},
                                    {"allowed_token_ids": (MASK_ID,)},
                                    {"allowed_token_ids": (20,), "bad_words_token_ids": ((20, 20),)}])
@pytest.mark.parametrize("mode", MODES)
def test_controls_that_leave_nothing_possible_fall_back_to_the_model_rows(tiny_llm, mode, kwargs, caplog):
    """No NaN, no crash: an emptied row is the model's own, and the request's log says so once."""
    caplog.set_level("WARNING", logger="trimode.engine")
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=6, mode=mode, temperature=1.0, seed=1,
                                                        **kwargs))[0]
    assert out.token_ids and MASK_ID not in out.token_ids
    assert sum("leave no token possible" in r.getMessage() for r in caplog.records) == 1
