"""The greedy chain under a grammar (`engine.logits_processing.greedy_chain`, `GrammarProcessor.allows` and its
speculative path) against the plain definition: every row masked by a fresh matcher that stands on the committed
output plus the row's prefix, then the argmax.

Rounds of a draft chain (each row after the picks before it) and a verify chain (each row after the given drafts,
up to the first pick that differs) run on one processor across many rounds, as a self_spec request would use it,
with random logits leaning now to grammatical tokens and now away from them, with and without other controls.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from engine.grammar import GrammarCompilerCache, GrammarProcessor, attach_grammar, grammar_of
from engine.logits_processing import Penalties, build_pipeline, greedy_chain
from engine.sampling import exclude, greedy
from engine.sequence import SamplingParams, Sequence
from engine.structured import GrammarSpec
from engine.tokenizer import load_tokenizer
from tests.checkpoints import EOS_ID, MASK_ID, VOCAB
from tests.server_fixtures import write_char_tokenizer

SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}, "b": {"enum": ["xy", "z"]}},
          "required": ["a", "b"], "additionalProperties": False}
SPECS = [GrammarSpec("json", json.dumps(SCHEMA)), GrammarSpec("regex", r"[a-c]{2,6}-[0-9]{1,3}")]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return load_tokenizer(write_char_tokenizer(tmp_path_factory.mktemp("chars")))


def _reference(compiled, seq: Sequence, row: torch.Tensor, prefix: tuple[int, ...]) -> int:
    """The row's pick by the definition: the other controls, then a fresh matcher's mask after output + prefix."""
    fresh = GrammarProcessor(compiled, VOCAB, [EOS_ID])
    out = row[None].float().clone()
    for proc in seq.logits_pipeline.processors:
        out = (fresh if isinstance(proc, GrammarProcessor) else proc)(out, seq, [prefix])
    return int(greedy(exclude(out, MASK_ID)))


def _logits(rng: random.Random, tokenizer, n: int, lean: float) -> torch.Tensor:
    """Random rows; with `lean` > 0 the characters JSON and the regex use are favoured (so the model's own pick is
    often grammatical, as with a real model), with 0 they are not (so the mask has to act)."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    rows = torch.randn(n, VOCAB, generator=g)
    if lean:
        ids = tokenizer.convert_tokens_to_ids(list('{}":,abcxyz-0123456789'))
        rows[:, [i for i in ids if isinstance(i, int) and 0 <= i < VOCAB]] += lean
    return rows


@pytest.mark.parametrize("spec", SPECS, ids=["json", "regex"])
@pytest.mark.parametrize("controls", [False, True], ids=["grammar", "grammar+penalties"])
def test_greedy_chains_equal_the_masked_argmax_row_by_row(tokenizer, spec: GrammarSpec,
                                                          controls: bool) -> None:
    compiled = GrammarCompilerCache(tokenizer, VOCAB).compile(spec)
    rng = random.Random(3)
    allowed_rows = refused_rows = 0
    for trial in range(6):
        params = SamplingParams(max_tokens=64, structured=spec,
                                **({"presence_penalty": 0.5, "repetition_penalty": 1.3} if controls else {}))
        seq = Sequence(f"t{trial}", [5, 6, 7], 3, params, frozenset({EOS_ID}))
        seq.logits_pipeline = build_pipeline(params, stop_ids=[EOS_ID], mask_id=MASK_ID)
        attach_grammar(seq, tokenizer, VOCAB, [EOS_ID])
        assert isinstance(seq.logits_pipeline.processors[0], Penalties) == controls
        grammar = grammar_of(seq)
        for _ in range(12):
            if grammar.matcher.is_terminated() and not grammar.path or seq.num_output_tokens > 40:
                break
            k = rng.randrange(1, 7)
            lean = rng.choice([0.0, 3.0, 6.0])
            draft_rows = _logits(rng, tokenizer, k, lean)
            drafts = greedy_chain(draft_rows, seq, MASK_ID)
            want: list[int] = []
            for i in range(k):
                want.append(_reference(compiled, seq, draft_rows[i], tuple(want)))
            assert drafts == want
            if rng.random() < 0.3:  # a draft that parts from the chain's picks (another drafter)
                drafts[rng.randrange(k)] = rng.randrange(VOCAB)
            verify_rows = _logits(rng, tokenizer, k + 1, lean)
            verify_rows[:k][torch.arange(k), torch.tensor(drafts)] += rng.choice([0.0, 8.0])  # often agree
            picks = greedy_chain(verify_rows, seq, MASK_ID, follow=drafts)
            ref: list[int] = []
            for i in range(k + 1):
                ref.append(_reference(compiled, seq, verify_rows[i], tuple(drafts[:i])))
                if i == k or ref[-1] != drafts[i]:
                    break
            assert picks == ref
            allowed_rows += sum(int(exclude(verify_rows[i:i + 1], MASK_ID).argmax()) == t for i, t in enumerate(ref))
            refused_rows += sum(int(exclude(verify_rows[i:i + 1], MASK_ID).argmax()) != t for i, t in enumerate(ref))
            seq.token_ids.extend(picks)  # the round emits them: the processor follows on its next call
    assert allowed_rows and refused_rows  # both ways through the chain were taken


def test_the_path_survives_masks_first_refused_and_emitted_tokens(tokenizer) -> None:
    """After any mix of calls the processor's masks equal a fresh matcher's for the committed output."""
    spec = SPECS[0]
    compiled = GrammarCompilerCache(tokenizer, VOCAB).compile(spec)
    seq = Sequence("p", [5, 6], 2, SamplingParams(max_tokens=64, structured=spec), frozenset({EOS_ID}))
    attach_grammar(seq, tokenizer, VOCAB, [EOS_ID])
    grammar = grammar_of(seq)
    text = tokenizer.encode('{"a": "ab", "b": "z"}', add_special_tokens=False)
    assert grammar.first_refused(seq, text + [EOS_ID, 3]) == len(text) + 1  # nothing after the stop id
    rows = torch.zeros(3, VOCAB)
    grammar(rows, seq, [tuple(text[:4]), (), tuple(text[:2])])
    seq.token_ids.extend(text[:3])  # emitted: on the path, then off it
    seq.token_ids.append(text[3])
    for prefix in [(), tuple(text[4:6])]:
        got = grammar(torch.zeros(1, VOCAB), seq, [prefix])
        want = GrammarProcessor(compiled, VOCAB, [EOS_ID])(torch.zeros(1, VOCAB), seq, [prefix])
        assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert grammar.allows(seq, (), text[4]) and not grammar.allows(seq, (), tokenizer.convert_tokens_to_ids("}"))
