"""Speculative sampling is exact: self_spec's and auto's first tokens at T > 0 follow ar's distribution.

On a random tri-mode checkpoint with a 16-token vocabulary, ar's exact distribution of the first three output
tokens is enumerated from full-recompute logits (15 x 15 x 15 prefixes, the mask id excluded); many requests,
each with its own seed (or, for auto's unseeded path, the engine's seeded RNG), sample those tokens through the
engine; a chi-square test compares the counts. `max_tokens` 4 makes the first round draft two positions, so the
three tokens cover a kept draft, a rejected one with its residual, and the bonus. Every draw is seeded, so a test
gives the same statistic on every run: it cannot flake, and it is checked at significance 0.001. A biased rule
(residual = p instead of max(0, p - q)) fails the same test by a wide margin, which shows it has the power to fail.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import engine.decoding.spec as spec_module
from engine.decoding.auto import AR, SPEC
from engine.decoding.modes import MODES
from engine.llm import LLM
from engine.sampling import probabilities
from engine.sequence import SamplingParams
from tests.checkpoints import MASK_ID, write_nld_checkpoint
from tests.reference import _logits

ALPHA = 0.001  # significance of every chi-square test here
VOCAB = 16
PROMPT = [5, 9, 4, 12, 7]
N = 2000  # samples per distribution test
DEPTH = 3  # output tokens whose joint distribution is tested
FILTERS = {"plain": {}, "top-k/top-p": {"top_k": 6, "top_p": 0.9}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_vocab_ckpt(tmp_path_factory):
    return write_nld_checkpoint(tmp_path_factory.mktemp("v16") / "ckpt", lora_rank=4, vocab_size=VOCAB)


def make_llm(ckpt) -> LLM:
    """A fresh engine (its RNG, which seeds unseeded requests, starts from `[engine] seed` = 0)."""
    return LLM(model=str(ckpt), num_kv_tokens=16384, max_num_seqs=64, cpu_kernels="torch")


def exact_distribution(model, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """ar's probability of every first-`DEPTH`-token output, from full-recompute logits."""
    dist: dict[tuple[int, ...], float] = {}

    def walk(prefix: list[int], prob: float) -> None:
        if len(prefix) == DEPTH:
            dist[tuple(prefix)] = prob
            return
        ids = PROMPT + prefix
        p = probabilities(_logits(model, ids, len(ids))[-1:], params, MASK_ID)[0]
        for tok in p.nonzero().squeeze(1).tolist():
            walk(prefix + [tok], prob * float(p[tok]))

    walk([], 1.0)
    return dist


def chi_square(counts: dict[tuple[int, ...], int], dist: dict[tuple[int, ...], float], n: int) -> tuple[float, int,
                                                                                                        float]:
    """(statistic, degrees of freedom, p-value); cells expecting fewer than 5 samples are pooled into one."""
    assert set(counts) <= set(dist), f"outputs ar can never produce: {set(counts) - set(dist)}"
    stat, cells, pool_e, pool_o = 0.0, 0, 0.0, 0
    for cell, prob in dist.items():
        e = prob * n
        if e >= 5:
            stat += (counts.get(cell, 0) - e) ** 2 / e
            cells += 1
        else:
            pool_e += e
            pool_o += counts.get(cell, 0)
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / pool_e
        cells += 1
    df = cells - 1
    p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                      torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, df, p


def sample_counts(llm: LLM, params: list[SamplingParams]) -> dict[tuple[int, ...], int]:
    outs = llm.generate([PROMPT] * len(params), params)
    counts: dict[tuple[int, ...], int] = {}
    for o in outs:
        counts[tuple(o.token_ids[:DEPTH])] = counts.get(tuple(o.token_ids[:DEPTH]), 0) + 1
    return counts


def seeds(tag: str) -> range:
    """N seeds of their own for each test: tests sharing seeds would share their first tokens' draws (the prefill
    samples them the same way in every mode), so one unlucky stretch of seeds would tilt them all alike."""
    base = zlib.crc32(tag.encode()) % 100_000 * 10_000
    return range(base, base + N)


def sampling(temperature: float, filters: dict, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=DEPTH + 1, temperature=temperature, ignore_eos=True, **filters, **kw)


def mixed_choices(llm: LLM, monkeypatch) -> None:
    """auto alternates ar steps and self_spec rounds, starting differently per request, so samples come through
    both and through switches between them (the choice itself never changes what is emitted)."""
    planner = llm.engine.decoder_ctx.auto
    assert planner is not None

    def decide(seq, st):
        n = st.ar_iterations + sum(st.rounds.values()) + int(seq.request_id.rsplit("-", 1)[-1])
        return (SPEC, 8) if n % 2 == 0 else (AR, 0)

    monkeypatch.setattr(planner, "decide", decide)


def count_reused_rounds(monkeypatch) -> dict[bool, int]:
    """Rounds verified, by whether their drafts were left over from an earlier round's draft forward."""
    rounds = {False: 0, True: 0}
    verify = spec_module.SelfSpec._verify

    def counting(self, st, seq, logits, ctx):
        rounds[st.reused] += 1
        return verify(self, st, seq, logits, ctx)

    monkeypatch.setattr(spec_module.SelfSpec, "_verify", counting)
    return rounds


@pytest.mark.parametrize("filters", FILTERS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_self_spec_first_tokens_follow_ar_exactly(small_vocab_ckpt, temperature, filters, monkeypatch):
    """A first round rejected at its first draft leaves its second draft to a round without a draft forward, so
    the third token comes through fresh and reused drafts alike."""
    llm = make_llm(small_vocab_ckpt)
    rounds = count_reused_rounds(monkeypatch)
    dist = exact_distribution(llm.engine.runner.model, sampling(temperature, FILTERS[filters]))
    params = [sampling(temperature, FILTERS[filters], mode="self_spec", seed=s)
              for s in seeds(f"self_spec {temperature} {filters}")]
    stat, df, p = chi_square(sample_counts(llm, params), dist, N)
    assert p > ALPHA, f"chi2 {stat:.1f} on {df} df: p = {p:.2g}"
    assert rounds[True] > N / 10 and rounds[False] >= N  # both kinds of round ran, many times


@pytest.mark.parametrize("filters", FILTERS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_auto_first_tokens_follow_ar_exactly(small_vocab_ckpt, temperature, filters, monkeypatch):
    """Half the requests seeded (keyed rounds), half not (speculative sampling from the engine's RNG)."""
    llm = make_llm(small_vocab_ckpt)
    mixed_choices(llm, monkeypatch)
    calls = {"speculative": 0, "keyed": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(spec_module, "speculative_verify", counting("speculative", spec_module.speculative_verify))
    monkeypatch.setattr(spec_module, "keyed_pick", counting("keyed", spec_module.keyed_pick))
    dist = exact_distribution(llm.engine.runner.model, sampling(temperature, FILTERS[filters]))
    params = [sampling(temperature, FILTERS[filters], mode="auto", seed=s if s % 2 else None)
              for s in seeds(f"auto {temperature} {filters}")]
    counts = sample_counts(llm, params)
    stat, df, p = chi_square(counts, dist, N)
    assert p > ALPHA, f"chi2 {stat:.1f} on {df} df: p = {p:.2g}"
    assert calls["speculative"] > N / 4 and calls["keyed"] > N / 4  # both kinds of round ran, many times


def test_threshold_drafting_with_a_one_hot_q_is_exact(small_vocab_ckpt):
    """Several draft forwards commit out of order: argmax drafts, kept with probability p(d)."""
    llm = make_llm(small_vocab_ckpt)
    dist = exact_distribution(llm.engine.runner.model, sampling(1.0, {}))
    params = [sampling(1.0, {}, mode="self_spec", threshold=0.5, seed=s) for s in seeds("threshold")]
    stat, df, p = chi_square(sample_counts(llm, params), dist, N)
    assert p > ALPHA, f"chi2 {stat:.1f} on {df} df: p = {p:.2g}"


def test_a_biased_rule_fails_the_same_test(small_vocab_ckpt, monkeypatch):
    """The residual drawn from p itself (forgetting to subtract q) favours the drafts: rejected at once."""
    real = spec_module.speculative_verify

    def biased(p, drafts, q, generator):
        c, _ = real(p, drafts, q, generator)
        return c, int(torch.multinomial(p[min(c, len(drafts))], 1, generator=generator))

    monkeypatch.setattr(spec_module, "speculative_verify", biased)
    llm = make_llm(small_vocab_ckpt)
    dist = exact_distribution(llm.engine.runner.model, sampling(1.0, {}))
    params = [sampling(1.0, {}, mode="self_spec", seed=s) for s in seeds("biased")]
    stat, df, p = chi_square(sample_counts(llm, params), dist, N)
    assert p < 1e-6, f"the biased rule passed: chi2 {stat:.1f} on {df} df, p = {p:.2g}"


def test_a_biased_rule_in_reused_rounds_alone_fails_the_same_test(small_vocab_ckpt, monkeypatch):
    """The residual drawn from p in the rounds over leftover drafts only: the test sees those rounds' tokens."""
    real_verify, real_rule = spec_module.SelfSpec._verify, spec_module.speculative_verify

    def biased(p, drafts, q, generator):
        c, _ = real_rule(p, drafts, q, generator)
        return c, int(torch.multinomial(p[min(c, len(drafts))], 1, generator=generator))

    def verify(self, st, seq, logits, ctx):
        monkeypatch.setattr(spec_module, "speculative_verify", biased if st.reused else real_rule)
        return real_verify(self, st, seq, logits, ctx)

    monkeypatch.setattr(spec_module.SelfSpec, "_verify", verify)
    llm = make_llm(small_vocab_ckpt)
    dist = exact_distribution(llm.engine.runner.model, sampling(1.0, {}))
    params = [sampling(1.0, {}, mode="self_spec", seed=s) for s in seeds("biased reused")]
    stat, df, p = chi_square(sample_counts(llm, params), dist, N)
    assert p < 1e-6, f"the biased rule passed: chi2 {stat:.1f} on {df} df, p = {p:.2g}"


@pytest.mark.parametrize("mode", ["self_spec", "auto"])
def test_seeded_sampling_is_independent_of_the_batch(small_vocab_ckpt, mode):
    """A seeded request's tokens alone equal its tokens among 15 others of every mode (auto: keyed rounds)."""
    llm = make_llm(small_vocab_ckpt)
    target = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=77, mode=mode, ignore_eos=True)
    alone = llm.generate([PROMPT], target)[0].token_ids
    others = [SamplingParams(max_tokens=30, temperature=t, seed=s, mode=m, ignore_eos=True)
              for m, t, s in zip(list(MODES) * 4, [0.0, 0.8, 1.0, 0.6] * 4,
                                 [None, 3, None, 5] * 4)][:15]
    prompts = [[5 + i % 9, 6, 7 + i % 3] for i in range(15)]
    together = llm.generate(prompts[:7] + [PROMPT] + prompts[7:], others[:7] + [target] + others[7:])
    assert together[7].token_ids == alone
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks
