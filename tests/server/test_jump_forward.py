"""Jump-forward under a grammar: where the grammar forces the next tokens, `ar` carries them in one forward and
`self_spec` puts them at the head of its draft block, and neither changes what is emitted.

On the tiny random checkpoint with the char tokenizer, the regex `[a-c]xyz[0-9]` forces `xyz` after a free first
character and before a free digit: greedy outputs with jump-forward equal the token-by-token ones (the forced-token
helper patched to force nothing) in every mode, in fewer forwards; at T = 1 the (first character, digit) pairs of
ar token by token, ar jumping and self_spec drafting after forced tokens follow one distribution (a chi-square test
of homogeneity on seeded draws, so it cannot flake).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import engine.decoding.ar as ar_module
import engine.decoding.spec as spec_module
from engine.decoding.modes import MODES
from engine.grammar import attach_grammar, forced_tokens
from engine.llm import LLM
from engine.logits_processing import build_pipeline
from engine.sequence import SamplingParams, Sequence
from engine.structured import GrammarSpec
from server.metrics import ServerMetrics

REGEX = GrammarSpec("regex", r"[a-c]xyz[0-9]")
SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}, "name": {"type": "string",
                                                                                   "maxLength": 6}},
          "required": ["mood", "name"], "additionalProperties": False}
ALPHA = 0.001


@pytest.fixture(scope="module")
def llm(ckpt: Path) -> LLM:
    return LLM(model=str(ckpt), device="cpu", num_kv_tokens=16384, max_num_seqs=64)


def _seq(llm: LLM, spec: GrammarSpec, output: str, **params) -> Sequence:
    tok = llm.tokenizer
    eos = tok.eos_token_id
    sp = SamplingParams(max_tokens=32, structured=spec, **params)
    seq = Sequence("s", [5, 6], 2, sp, frozenset({eos}))
    seq.logits_pipeline = build_pipeline(sp, stop_ids=[eos])
    attach_grammar(seq, tok, llm.engine.model_config.vocab_size, [eos])
    seq.token_ids += tok.encode(output, add_special_tokens=False)
    return seq


def test_forced_tokens_are_the_grammars_and_stop_at_a_banned_one(llm: LLM) -> None:
    tok = llm.tokenizer
    ids = tok.encode("xyz", add_special_tokens=False)
    assert forced_tokens(_seq(llm, REGEX, "b"), 10) == ids
    assert forced_tokens(_seq(llm, REGEX, "b"), 2) == ids[:2]
    assert forced_tokens(_seq(llm, REGEX, ""), 10) == []  # [a-c] is a choice
    assert forced_tokens(_seq(llm, REGEX, "bxyz"), 10) == []  # so is the digit
    # a token another control bans is not forced: its row keeps the grammar's full mask and the model's pick
    assert forced_tokens(_seq(llm, REGEX, "b", bad_words_token_ids=[(ids[1],)]), 10) == ids[:1]


def _no_jumps(monkeypatch) -> None:
    monkeypatch.setattr(ar_module, "forced_tokens", lambda seq, limit: [])
    monkeypatch.setattr(spec_module, "forced_tokens", lambda seq, limit: [])


def _run(llm: LLM, params: list[SamplingParams]) -> tuple[list[list[int]], int, ServerMetrics]:
    """Outputs of `params` (one prompt each), the engine steps they took, and the metrics fed those steps."""
    eng = llm.engine
    metrics = ServerMetrics("m")
    prompt = llm.tokenizer.encode("Say:", add_special_tokens=False)
    for i, p in enumerate(params):
        eng.add_request(f"j{i}", prompt, p)
    outs: dict[str, list[int]] = {f"j{i}": [] for i in range(len(params))}
    steps = 0
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] += o.new_token_ids
        metrics.on_step(eng.last_stats)
        steps += 1
    return list(outs.values()), steps, metrics


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec", [REGEX, GrammarSpec("json", json.dumps(SCHEMA))], ids=["regex", "json"])
def test_greedy_jump_forward_emits_the_token_by_token_output(llm: LLM, mode: str, spec: GrammarSpec,
                                                            monkeypatch) -> None:
    params = [SamplingParams(max_tokens=40, mode=mode, structured=spec)]
    jumped, steps, metrics = _run(llm, params)
    forced = metrics.registry.get_sample_value("trimode:grammar_forced_tokens_total", {"model_name": "m"})
    with monkeypatch.context() as m:
        _no_jumps(m)
        plain, plain_steps, _ = _run(llm, params)
    assert jumped == plain
    if mode == "diffusion":  # (diffusion commits forced tokens through its masks: nothing to jump)
        assert forced == 0
        return
    assert forced >= 3  # xyz, or the schema's `", "name": "` and more
    if mode == "ar":  # one forward for the forced tokens and the one after them
        assert steps == plain_steps - forced


def _pairs(outs: list[list[int]], tok) -> dict[str, int]:
    counts: dict[str, int] = {}
    for out in outs:
        text = tok.decode(out, skip_special_tokens=True)
        assert len(text) == 5 and text[1:4] == "xyz", text
        counts[text[0] + text[4]] = counts.get(text[0] + text[4], 0) + 1
    return counts


def _homogeneity(a: dict[str, int], b: dict[str, int]) -> float:
    """p-value of the chi-square test that two samples of equal size come from one distribution (cells with fewer
    than 10 samples in both together are pooled)."""
    n_a, n_b = sum(a.values()), sum(b.values())
    assert n_a == n_b
    stat, cells, pool = 0.0, 0, [0, 0]
    for cell in set(a) | set(b):
        x, y = a.get(cell, 0), b.get(cell, 0)
        if x + y < 10:
            pool[0] += x
            pool[1] += y
            continue
        stat += (x - y) ** 2 / (x + y)
        cells += 1
    if sum(pool):
        stat += (pool[0] - pool[1]) ** 2 / sum(pool)
        cells += 1
    df = cells - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_sampled_jump_forward_keeps_ar_s_distribution(llm: LLM, monkeypatch) -> None:
    n = 1200

    def params(mode: str, base: int) -> list[SamplingParams]:
        return [SamplingParams(max_tokens=6, mode=mode, temperature=1.0, seed=base + i, structured=REGEX)
                for i in range(n)]

    tok = llm.tokenizer
    with monkeypatch.context() as m:
        _no_jumps(m)
        stepwise = _pairs(_run(llm, params("ar", 0))[0], tok)
    jumped = _pairs(_run(llm, params("ar", 10_000))[0], tok)
    spec_outs, _, metrics = _run(llm, params("self_spec", 20_000))
    drafted = _pairs(spec_outs, tok)
    # self_spec's first round is [first, x, y, z, mask]: one sampled draft after three forced ones
    assert metrics.registry.get_sample_value("trimode:grammar_forced_tokens_total", {"model_name": "m"}) == 3 * n
    assert len(stepwise) >= 6  # the test has cells to compare
    assert _homogeneity(stepwise, jumped) > ALPHA
    assert _homogeneity(stepwise, drafted) > ALPHA


@pytest.mark.parametrize("mode", ["ar", "self_spec", "auto"])
def test_forced_tokens_have_their_logprobs(llm: LLM, mode: str, monkeypatch) -> None:
    """A jumped or forced-draft token's logprob is the model's own for it, as when a step of its own chose it."""
    def run() -> tuple[list[int], list]:
        params = SamplingParams(max_tokens=6, mode=mode, logprobs=2, structured=REGEX)
        out = llm.generate([llm.tokenizer.encode("Say:", add_special_tokens=False)], params)[0]
        return out.token_ids, out.logprobs

    tokens, lps = run()
    with monkeypatch.context() as m:
        _no_jumps(m)
        plain_tokens, plain_lps = run()
    assert tokens == plain_tokens and len(lps) == len(tokens) == 6  # a-c, x, y, z, a digit, EOS
    for lp, plain in zip(lps, plain_lps, strict=True):
        assert lp.logprob == pytest.approx(plain.logprob, abs=1e-4)
        assert [t for t, _ in lp.top] == [t for t, _ in plain.top]
