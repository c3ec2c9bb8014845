"""`auto`: exactness whatever it chooses, its cost model, its acceptance estimates, its plan and its hysteresis.

Whether auto's choices are fast depends on the machine, so no test here depends on them: the engine-level tests
force the choices (every pattern must give ar's tokens), and the planner tests run on cost curves and acceptance
given by the test.
"""

from __future__ import annotations

import json
import random

import pytest

from engine.decoding import auto as auto_module
from engine.decoding.auto import (
    AR,
    SPEC,
    Acceptance,
    AcceptancePrior,
    AutoPlanner,
    AutoState,
    alpha_for,
    expected_accepted,
)
from engine.decoding.costs import Curve, ForwardCosts, measure
from engine.decoding.modes import AUTO_CHOICES, AUTO_ITERATIONS, MODES
from engine.engine import BUILTIN_MODEL
from engine.forward import BatchKey, Forward, ForwardRequest
from engine.llm import LLM
from engine.sequence import SamplingParams, Sequence
from tests.checkpoints import MASK_ID, write_nld_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ragged_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 96) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


def force(llm: LLM, monkeypatch, pattern: str) -> None:
    """Make auto's choices deterministic: always ar, always self_spec (block 8, or 4 every third round), or
    alternating, starting differently per request."""
    planner = llm.engine.decoder_ctx.auto
    assert planner is not None

    def decide(seq, st):
        done = st.ar_iterations + sum(st.rounds.values())
        if pattern == "ar":
            return (AR, 0)
        if pattern == "self_spec":
            return (SPEC, 4 if done % 3 == 2 else 8)
        return (SPEC, 8) if (done + len(seq.request_id)) % 2 == 0 else (AR, 0)

    monkeypatch.setattr(planner, "decide", decide)


# ---- exactness whatever auto chooses --------------------------------------------------------------------------
@pytest.mark.parametrize("batch,pattern", [(1, "planner"), (1, "self_spec"), (1, "alternate"), (16, "planner"),
                                           (16, "ar"), (16, "alternate")])
def test_greedy_auto_equals_greedy_ar(tiny_llm, monkeypatch, pattern, batch):
    if pattern != "planner":
        force(tiny_llm, monkeypatch, pattern)
    prompts = ragged_prompts(batch, seed=batch)
    ar = tiny_llm.generate(prompts, SamplingParams(max_tokens=30, mode="ar", ignore_eos=True))
    auto = tiny_llm.generate(prompts, SamplingParams(max_tokens=30, mode="auto", ignore_eos=True))
    assert [o.token_ids for o in auto] == [o.token_ids for o in ar]
    assert all(o.mode == "auto" and o.finish_reason == "length" for o in auto)


@pytest.mark.parametrize("pattern", ["planner", "self_spec", "alternate"])
def test_greedy_auto_equals_ar_inside_a_batch_of_16_mixing_every_mode(tiny_llm, monkeypatch, pattern):
    if pattern != "planner":
        force(tiny_llm, monkeypatch, pattern)
    prompts = ragged_prompts(16, seed=7)
    params = [SamplingParams(max_tokens=25, mode=MODES[i % len(MODES)], ignore_eos=True, block_length=(8, 4)[i % 2],
                             threshold=0.7 if MODES[i % len(MODES)] == "diffusion" else None) for i in range(16)]
    together = tiny_llm.generate(prompts, params)
    autos = [i for i, p in enumerate(params) if p.mode == "auto"]
    assert len(autos) == 4
    ar = tiny_llm.generate([prompts[i] for i in autos], SamplingParams(max_tokens=25, mode="ar", ignore_eos=True))
    assert [together[i].token_ids for i in autos] == [o.token_ids for o in ar]


def test_seeded_auto_gives_the_same_tokens_whatever_it_chooses(tiny_llm, monkeypatch):
    """Keyed rounds: at T > 0 a seeded auto request's tokens depend on its seed alone, not on its choices."""
    prompts = ragged_prompts(3, seed=11)
    params = [SamplingParams(max_tokens=28, temperature=0.9, top_k=40, seed=100 + i, mode="auto", ignore_eos=True)
              for i in range(3)]
    outputs = []
    for pattern in ("ar", "self_spec", "alternate"):
        force(tiny_llm, monkeypatch, pattern)
        outputs.append([o.token_ids for o in tiny_llm.generate(prompts, params)])
        monkeypatch.undo()
    assert outputs[0] == outputs[1] == outputs[2]
    assert len({tuple(t) for t in outputs[0]}) == 3  # and they are samples, not one greedy continuation


def test_auto_survives_preemption_and_switches_keep_the_kv_invariant(tiny_ckpt, monkeypatch):
    """A pool too small for the batch preempts auto sequences mid-stream (mid-round too); with choices
    alternating, every switch between ar and self_spec must leave num_computed_tokens == len(token_ids) - 1."""
    small = LLM(model=str(tiny_ckpt), num_kv_tokens=128, kv_block_size=16, max_num_seqs=6, cpu_kernels="torch")
    force(small, monkeypatch, "alternate")
    eng = small.engine
    step = eng.step

    def checked_step():
        out = step()
        for seq in eng.scheduler.running:
            st = seq.state
            if isinstance(st, AutoState) and st.choice is None and not seq.is_prefilling:
                assert seq.num_computed_tokens == len(seq.token_ids) - 1
        return out

    eng.step = checked_step
    prompts = ragged_prompts(6, seed=5)
    auto = small.generate(prompts, SamplingParams(max_tokens=40, mode="auto", ignore_eos=True))
    assert eng.scheduler.num_preemptions > 0
    ar = small.generate(prompts, SamplingParams(max_tokens=40, mode="ar", ignore_eos=True))
    assert [o.token_ids for o in auto] == [o.token_ids for o in ar]
    assert eng.num_free_blocks == eng.num_total_blocks


def test_auto_on_a_plain_causal_checkpoint_is_ar(tmp_path):
    plain = write_nld_checkpoint(tmp_path / "plain", model_type="llama", architectures=["LlamaForCausalLM"])
    llm = LLM(model=str(plain), num_kv_tokens=2048, cpu_kernels="torch", default_mode="auto")
    assert llm.engine.decoder_ctx.auto is None and not llm.engine.is_trimode
    prompts = ragged_prompts(2, seed=3)
    auto = llm.generate(prompts, SamplingParams(max_tokens=12, mode="auto", ignore_eos=True))
    default = llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    ar = llm.generate(prompts, SamplingParams(max_tokens=12, mode="ar", ignore_eos=True))
    assert [o.token_ids for o in auto] == [o.token_ids for o in ar] == [o.token_ids for o in default]
    assert {o.mode for o in auto} == {"auto"} and {o.mode for o in default} == {"ar"}
    with pytest.raises(ValueError, match="tri-mode"):
        llm.generate(prompts, SamplingParams(max_tokens=4, mode="self_spec"))


def test_steps_with_auto_is_refused_naming_the_field(tiny_llm):
    with pytest.raises(ValueError, match=r"^steps 4: .*never runs diffusion"):
        tiny_llm.engine.policy.resolve_params(SamplingParams(mode="auto", steps=4))
    resolved = tiny_llm.engine.policy.resolve_params(SamplingParams(mode="auto", block_length=4, threshold=0.5))
    assert (resolved.mode, resolved.block_length, resolved.threshold) == ("auto", 4, 0.5)


def test_block_length_bounds_what_auto_may_choose(tiny_llm, monkeypatch):
    """The planner's plan never goes past a request's block_length, and a forced choice beyond it becomes ar."""
    planner = tiny_llm.engine.decoder_ctx.auto
    lengths = []
    real = auto_module.SelfSpec.begin

    def spy(seq, ctx, block_length, keyed=False):
        lengths.append(block_length)
        return real(seq, ctx, block_length, keyed)

    monkeypatch.setattr(auto_module._SPEC, "begin", spy)
    monkeypatch.setattr(planner, "plan", lambda members: {s.request_id: (SPEC, 64) for s in members})
    tiny_llm.generate(ragged_prompts(2), SamplingParams(max_tokens=12, mode="auto", block_length=4, ignore_eos=True))
    assert lengths == []  # 64 > 4: every iteration decoded as ar
    monkeypatch.setattr(planner, "plan", lambda members: {s.request_id: (SPEC, 4) for s in members})
    tiny_llm.generate(ragged_prompts(2), SamplingParams(max_tokens=12, mode="auto", block_length=4, ignore_eos=True))
    assert lengths and set(lengths) == {4}


def test_every_iteration_is_counted_and_described(tiny_llm, monkeypatch):
    force(tiny_llm, monkeypatch, "alternate")
    eng = tiny_llm.engine
    eng.add_request("d", [9, 8, 7], SamplingParams(max_tokens=30, mode="auto", ignore_eos=True))
    counted = {c: 0 for c in AUTO_CHOICES}
    final = None
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                final = out
        for c in AUTO_CHOICES:
            counted[c] += eng.last_stats.counters.get(AUTO_ITERATIONS[c], 0)
    assert final is not None and final.decoded is not None
    described = dict(part.split(":") for part in final.decoded.split(","))
    assert int(described["ar"]) == counted["ar"] > 0
    assert sum(int(v) for k, v in described.items() if k.startswith("self_spec/")) == counted["self_spec"] > 0


def test_the_engine_feeds_every_step_to_the_planner(tiny_llm):
    planner = tiny_llm.engine.decoder_ctx.auto
    before = planner.steps
    tiny_llm.generate(ragged_prompts(2), SamplingParams(max_tokens=6, mode="ar", ignore_eos=True))
    assert planner.steps >= before + 5
    assert planner.running is tiny_llm.engine.scheduler.running


# ---- the cost model -------------------------------------------------------------------------------------------
def test_cost_curves_interpolate_stay_monotone_and_extend():
    c = Curve([(1, 2.0), (4, 2.6), (16, 1.5), (16, 9.0), (64, 20.0)])  # two noisy repeats at 16, one dip
    assert c.rows == [1, 4, 16, 64]
    assert c.seconds == sorted(c.seconds)  # the dip below 4 rows is pooled away
    assert c(0.5) == c(1) == 2.0
    assert c(40) == pytest.approx((c(16) + c(64)) / 2)
    assert c(128) == pytest.approx(c(64) + (c(64) - c(16)) / 48 * 64)  # the last segment's slope


def curves(a_ms: float, per_row_ms: float) -> dict[Forward, Curve]:
    pts = [(r, (a_ms + per_row_ms * r) / 1e3) for r in (1, 4, 16, 64, 256, 1024)]
    return {k: Curve(pts) for k in (Forward.AR_DECODE, Forward.DRAFT, Forward.VERIFY)}


def test_online_factors_follow_the_machine_and_each_shape():
    costs = ForwardCosts(curves(2.0, 0.1))
    base16, base1 = costs.seconds(Forward.VERIFY, 16), costs.seconds(Forward.AR_DECODE, 1)
    for _ in range(200):  # everything runs twice as slow: every shape, seen or not, follows
        costs.observe(Forward.AR_DECODE, 1, 2 * base1)
    assert costs.seconds(Forward.VERIFY, 16) == pytest.approx(2 * base16, rel=0.02)
    for _ in range(400):  # 16-row verifies alone are 50 % dearer than measured: only their shape learns it
        costs.observe(Forward.VERIFY, 16, 3 * base16)
        costs.observe(Forward.AR_DECODE, 1, 2 * base1)
    assert costs.seconds(Forward.VERIFY, 16) / costs.seconds(Forward.AR_DECODE, 1) == \
        pytest.approx(1.5 * base16 / base1, rel=0.1)
    costs.max_rows = 256
    assert costs.seconds(Forward.DRAFT, 1024) == pytest.approx(4 * costs.seconds(Forward.DRAFT, 256))


def test_measure_times_every_kind_and_gives_the_pages_back(tiny_llm):
    eng = tiny_llm.engine
    free = eng.num_free_blocks
    costs = measure(eng.runner, eng.scheduler.blocks, True, MASK_ID, (4, 8), 8, max_seqs=16, budget_s=0.0)
    assert eng.num_free_blocks == free
    assert set(costs.curves) == {Forward.AR_DECODE, Forward.DRAFT, Forward.VERIFY}
    # a zero budget still measures the shapes that pin the curves down: 1, 4 and 16 sequences of each kind
    assert costs.curves[Forward.AR_DECODE].rows == [1, 4, 16]
    assert costs.curves[Forward.VERIFY].rows == [8, 32, 128]


# ---- acceptance ---------------------------------------------------------------------------------------------
def test_alpha_inverts_the_expected_acceptance():
    for alpha in (0.0, 0.2, 0.5, 0.83, 0.97):
        for block in (4, 16, 32):
            assert alpha_for(1 + expected_accepted(alpha, block - 1), block) == pytest.approx(alpha, abs=0.006)
    assert expected_accepted(1.0, 7) == 7 and expected_accepted(0.5, 0) == 0


def test_acceptance_matches_the_mean_of_bursty_rounds():
    est = Acceptance.seeded(0.5, 15, weight=1.0, decay=0.95)
    for i in range(200):  # all-or-nothing rounds averaging 7.5 drafts kept of 15
        est.update(15 if i % 2 else 0, 15)
    assert expected_accepted(est.alpha, 15) == pytest.approx(7.5, abs=0.5)


def test_the_prior_comes_from_the_model_card():
    prior = AcceptancePrior.from_checkpoint(BUILTIN_MODEL)
    figures = json.loads((BUILTIN_MODEL / "figures.json").read_text())
    block = figures["block_size"]
    assert 1 + expected_accepted(prior.greedy, block - 1) == pytest.approx(
        figures["self_spec"]["accepted_per_iteration"], abs=0.05)
    assert prior.sampled < prior.greedy and prior.block_length == block
    assert AcceptancePrior.from_checkpoint(None).source == "defaults"


# ---- the plan -------------------------------------------------------------------------------------------------
def planner_for(a_ms: float, per_row_ms: float, merged: bool, alpha: float = 0.85, **kw) -> AutoPlanner:
    prior = AcceptancePrior(alpha, 0.3, "test", 16)
    return AutoPlanner(ForwardCosts(curves(a_ms, per_row_ms)), prior, (4, 8, 16), merged=merged, **kw)


def autos(n: int, alpha: float | None = None, max_tokens: int = 128) -> list[Sequence]:
    seqs = []
    for i in range(n):
        seq = Sequence(f"a{i}", [5, 6, 7, 8], 4, SamplingParams(max_tokens=max_tokens, mode="auto", block_length=16),
                       frozenset())
        seq.num_computed_tokens = 4
        seq.token_ids.append(9)
        if alpha is not None:
            seq.state = AutoState(Acceptance.seeded(alpha, 15, weight=50.0, decay=0.9))
        seqs.append(seq)
    return seqs


@pytest.mark.parametrize("merged", [True, False])
def test_self_spec_at_low_load_ar_at_high_load(merged):
    """A CPU-like cost (fixed 2 ms + 0.15 ms per row): self_spec pays for one sequence, not for 32."""
    planner = planner_for(2.0, 0.15, merged)
    one, many = autos(1, alpha=0.85), autos(32, alpha=0.85)
    assert set(planner.plan(one).values()) <= {(SPEC, 4), (SPEC, 8), (SPEC, 16)}
    planner.running = many
    assert set(planner.plan(many).values()) == {(AR, 0)}


def test_a_weight_bound_gpu_speculates_at_every_load():
    """A GPU-like cost (a forward costs the same for 1 or 1000 rows): self_spec wins however many sequences."""
    planner = planner_for(20.0, 0.0005, merged=True)
    many = autos(32, alpha=0.7)
    planner.running = many
    assert {c[0] for c in planner.plan(many).values()} == {SPEC}


def test_low_acceptance_keeps_ar_and_the_plan_picks_the_best_sequences():
    planner = planner_for(2.0, 0.15, merged=True)
    assert set(planner.plan(autos(1, alpha=0.3)).values()) == {(AR, 0)}
    # four sequences, one of them in a repetitive stretch, and requests waiting for a place: only that one
    # speculates (it leaves sooner, and a waiting request takes its place)
    seqs = autos(3, alpha=0.3) + autos(1, alpha=0.99)
    seqs[-1].request_id = "lucky"
    planner.running = seqs
    planner.waiting = 2
    plan = planner.plan(seqs)
    assert plan["lucky"][0] == SPEC and [plan[s.request_id] for s in seqs[:3]] == [(AR, 0)] * 3


def test_a_draining_batch_speeds_no_one_at_the_others_cost():
    """Nothing waits to join: a sequence that leaves early frees a place nobody takes, so speculating for the lucky
    one alone only makes every step of the other three costlier; speculating for all pays when all are lucky."""
    planner = planner_for(2.0, 0.15, merged=True)
    seqs = autos(3, alpha=0.3) + autos(1, alpha=0.99)
    seqs[-1].request_id = "lucky"
    planner.running = seqs
    assert set(planner.plan(seqs).values()) == {(AR, 0)}
    lucky = autos(2, alpha=0.99)
    planner.running = lucky
    assert {c[0] for c in planner.plan(lucky).values()} == {SPEC}


def test_short_blocks_when_only_the_first_drafts_are_kept():
    """alpha 0.7: drafts past the first few are rarely kept, and a shorter block costs fewer rows (per step: ar
    1 / 3.15 ms; block 8: (1 + 2.14) / 2 tokens in 4.2 ms; block 16: (1 + 2.32) / 2 in 5.4 ms)."""
    planner = planner_for(3.0, 0.15, merged=True)
    assert planner.plan(autos(1, alpha=0.7)) == {"a0": (SPEC, 8)}
    assert planner.plan(autos(1, alpha=0.99)) == {"a0": (SPEC, 16)}


def test_the_running_assignment_stays_unless_the_margin_is_beaten():
    planner = planner_for(2.0, 0.15, merged=True, margin=1.0)
    seqs = autos(1, alpha=0.85)
    seqs[0].state.current = (AR, 0)
    assert planner.plan(seqs) == {"a0": (AR, 0)}  # self_spec is better here (+63 %), but not twice as good
    planner.margin = 0.1
    assert planner.plan(seqs)["a0"][0] == SPEC


def test_a_sequence_switches_only_after_patience_decisions(monkeypatch):
    planner = planner_for(2.0, 0.15, merged=True, patience=2)
    seq = autos(1, alpha=0.85)[0]
    st = seq.state
    st.current = (AR, 0)
    monkeypatch.setattr(planner, "plan", lambda members: {"a0": (SPEC, 8)})
    assert planner.decide(seq, st) == (AR, 0)  # the plan wants a switch once: not yet
    st.hold = 0
    assert planner.decide(seq, st) == (SPEC, 8)  # twice in a row: switch
    assert planner.decide(seq, st) == (SPEC, 8)


def test_ar_holds_for_a_few_iterations_and_the_last_token_is_always_ar(monkeypatch):
    planner = planner_for(2.0, 0.15, merged=True)
    monkeypatch.setattr(planner, "plan", lambda members: {"a0": (AR, 0)})
    seq = autos(1, alpha=0.85)[0]
    st = seq.state
    assert planner.decide(seq, st) == (AR, 0)
    monkeypatch.setattr(planner, "plan", lambda members: {"a0": (SPEC, 8)})
    for _ in range(auto_module._AR_HOLD - 1):
        assert planner.decide(seq, st) == (AR, 0)  # held: the plan is not consulted
    last = autos(1, alpha=0.99, max_tokens=6)[0]
    last.token_ids += [1, 1, 1, 1]  # 5 of 6 tokens out
    assert planner.decide(last, last.state) == (AR, 0)


def test_the_planner_learns_merging_from_the_steps():
    planner = planner_for(2.0, 0.15, merged=False)
    steps = [ForwardRequest(BatchKey(Forward.AR_DECODE), [5]), ForwardRequest(BatchKey(Forward.AR_DECODE), [6])]
    planner.observe(steps, 0.003, [])
    assert not planner.merged
    planner.observe(steps + [ForwardRequest(BatchKey(Forward.VERIFY, block_length=4), [1, 2, 3, 4])], 0.004, [])
    assert planner.merged


def test_auto_never_chooses_diffusion():
    assert AUTO_CHOICES == ("ar", "self_spec") and "diffusion" not in AUTO_CHOICES
    planner = planner_for(2.0, 0.15, merged=True)
    for n in (1, 4, 32):
        for alpha in (0.1, 0.9):
            seqs = autos(n, alpha=alpha)
            planner.running = seqs
            assert {c[0] for c in planner.plan(seqs).values()} <= {AR, SPEC}


def test_the_time_between_steps_is_a_per_step_cost_and_idle_gaps_are_not():
    """Scheduling and handing outputs to the server happen once per step: a cost the forwards alone do not show,
    and one that favours modes emitting more tokens per step. A long gap is the engine waiting for work."""
    ticks = iter([10.0, 10.010, 10.020, 11.5, 11.510])
    planner = planner_for(2.0, 0.15, merged=True, clock=lambda: next(ticks))
    step = [ForwardRequest(BatchKey(Forward.AR_DECODE), [5])]
    for _ in range(5):  # each step: 4 ms in the forward, 6 ms around it, except one idle gap of ~1.5 s
        planner.observe(step, 0.004, [])
    costs = planner.costs
    assert 0 < costs.step_overhead < 0.006  # three back-to-back gaps of 6 ms learned, the idle one not
    one, merged = costs.seconds(Forward.AR_DECODE, 1), costs.merged_seconds({Forward.AR_DECODE: 1.0})
    costs.step_overhead += 0.01
    assert costs.seconds(Forward.AR_DECODE, 1) == pytest.approx(one + 0.01)
    assert costs.merged_seconds({Forward.AR_DECODE: 1.0}) == pytest.approx(merged + 0.01)
