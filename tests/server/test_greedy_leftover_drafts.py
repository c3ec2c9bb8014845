"""Greedy self_spec rounds over leftover drafts: a round rejected at draft c + 1 leaves d_{c+2} .. d_k to the next
round, which verifies them without a draft forward of its own. Greedy verification is exact whatever it checks, so
the output must equal greedy `ar` token for token: unconstrained, under sampling controls (each verify row after
the drafts before it), and under a grammar, where the tokens it forces take their positions from the leftovers and
the leftovers it refuses are cut.

On the tiny random checkpoint drafts are rarely kept, so nearly every round leaves drafts over and reusing them
pays (`Tally.reuse_pays`); the instrumented verify checks that such rounds ran, with forced tokens and cuts, and
that each leftover is verified at the position its draft forward drafted it for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import engine.decoding.spec as spec_module
from engine.llm import LLM
from engine.sequence import SamplingParams
from engine.structured import GrammarSpec

SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]},
                                           "name": {"type": "string", "maxLength": 6},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                                    "maxItems": 3}},
          "required": ["mood", "name", "tags"], "additionalProperties": False}
CASES = {
    "free": {"ignore_eos": True},
    "penalties": {"ignore_eos": True, "repetition_penalty": 1.4, "presence_penalty": 0.5, "frequency_penalty": 0.3},
    "min_tokens and bad words": {"min_tokens": 12, "bad_words_token_ids": [(7,), (9, 10)]},
    "json": {"structured": GrammarSpec("json", json.dumps(SCHEMA))},
    "regex": {"structured": GrammarSpec("regex", r"([a-d]{1,3}xyz[0-9]){2,4}")},
}
PROMPTS = ["Say:", "Once upon a time", "x", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def llm(ckpt: Path) -> LLM:
    return LLM(model=str(ckpt), device="cpu", num_kv_tokens=16384, max_num_seqs=64)


def _outputs(llm: LLM, mode: str, kw: dict) -> list[list[int]]:
    params = SamplingParams(max_tokens=40, mode=mode, **kw)
    return [o.token_ids for o in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize("case", CASES)
def test_greedy_rounds_over_leftover_drafts_equal_ar(llm: LLM, case: str, monkeypatch) -> None:
    rounds: list[tuple[bool, int, int, int]] = []  # (reused, forced, drafts verified, drafts before the cut)
    verify, cut = spec_module.SelfSpec._verify, spec_module.SelfSpec._cut
    before: dict[int, int] = {}
    drafted: dict[str, dict[int, int]] = {}  # per request: the latest draft forward's token for each position

    def counting_verify(self, st, seq, logits, ctx):
        rounds.append((st.reused, st.forced, len(st.block) - 1, before.pop(id(st), len(st.block) - 1)))
        seed_at = len(seq.token_ids) - 1
        model_drafts = {seed_at + i: t for i, t in enumerate(st.block) if i > st.forced}
        if st.reused:  # a leftover is verified at the very position its draft forward drafted it for
            assert all(drafted[seq.request_id][pos] == t for pos, t in model_drafts.items())
        else:
            drafted[seq.request_id] = model_drafts
        return verify(self, st, seq, logits, ctx)

    def counting_cut(st, seq, grammar):
        before[id(st)] = len(st.block) - 1
        cut(st, seq, grammar)

    monkeypatch.setattr(spec_module.SelfSpec, "_verify", counting_verify)
    monkeypatch.setattr(spec_module.SelfSpec, "_cut", staticmethod(counting_cut))
    spec = _outputs(llm, "self_spec", CASES[case])
    assert spec == _outputs(llm, "ar", CASES[case])
    reused = [r for r in rounds if r[0]]
    assert len(reused) >= len(rounds) / 4  # rounds over leftover drafts ran, many of them
    if case in ("json", "regex"):
        assert any(r[1] > 0 for r in reused)  # forced tokens took leftovers' positions
    if case == "regex":
        assert any(r[2] < r[3] for r in reused)  # the grammar cut leftovers it refused
