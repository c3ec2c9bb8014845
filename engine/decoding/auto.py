"""`auto`: every iteration, per sequence, an `ar` decode or a `self_spec` round (and its draft length), whichever
the engine's cost model says gives the whole batch more output tokens per second of engine time.

Why it may switch at all: `ar` and `self_spec` both emit exactly the AR distribution token by token (greedy: the
same tokens), and both leave a sequence at an iteration boundary in the same state: every emitted token's K/V
committed except the newest one (`num_computed_tokens == len(token_ids) - 1`, `engine/sequence.py`), so either can
take the next iteration. `diffusion` is never chosen: its output is its own, not the AR model's, so choosing it
would change what a request returns.

The planner (`AutoPlanner`, one per engine, in `DecoderContext.auto`) holds
- the forward costs (`engine.decoding.costs`): measured at startup in a few seconds, refined from every step's time
  (the engine calls `observe` after each step);
- acceptance: per rule (greedy / sampled / keyed, one-shot or threshold drafting) an engine-wide estimate of alpha,
  the chance that one more draft is kept, seeded from the checkpoint's measured acceptance (`figures.json` of a
  model card, else a conservative default) and updated by the rounds nobody selected, self_spec requests' (auto's
  own rounds ran because an estimate said they would pay: a biased sample); per sequence a faster estimate seeded
  from it and updated by its rounds. Expected drafts kept with k drafts: alpha (1 - alpha^k) / (1 - alpha).

The plan (recomputed every few engine steps, or when a sequence it has not seen decides): over the running batch
(fixed-mode sequences priced as they are, auto sequences as the decision variables) it tries, for each allowed
draft length L, the top-m auto sequences by expected acceptance in `self_spec` with block L and the rest in `ar`,
m = 0 .. all, and predicts output tokens per second:
- the engine that carries every sequence's next forward in one forward per step (`engine/batch.py`'s sections)
  pays one forward per step: ar adds 1 row and 1 token per step, self_spec L rows and (1 + E) / 2 tokens;
- an engine that runs one group of equal forwards per step (the older rule; detected when no step ever carries two
  decode kinds) pays, per cycle, one forward of each group (the ar group, each block length's draft and verify
  groups, ...), and a sequence yields 1 token (ar) or 1 + E (self_spec) per cycle.
That is the batch's output rate while its sequences run, the right objective when requests wait for a place (a
sequence that leaves sooner lets one in). When nothing waits (the engine's queue is empty at the last step), the
batch drains: a sequence that leaves early frees a place nobody takes, so a plan is scored by the output until the
last sequence is done (`_drain_efficiency`): speculating for a few sequences while every step grows costlier for
the rest only pays if it shortens the slowest one's time. This is what `vllm bench serve`-style closed loops (a
fixed concurrency, each place running its requests one after another) measure.
Hysteresis: the best plan replaces the running assignment only when it predicts at least `margin` (10 %) more
tokens per second; a sequence switches only after `patience` (2) consecutive decisions that want the switch; and a
decision for ar covers `_AR_HOLD` (4) tokens. A sequence's acceptance estimate is shrunk towards the engine-wide
one for planning and, while it decodes ar (and so learns nothing), relaxes towards it, so it is tried again later.

Seeded requests at T > 0 run keyed rounds (`engine/decoding/spec.py`): each token is a function of the seed, its
position and the AR distribution alone, so the output does not depend on what auto chose and stays reproducible
under any load. Unseeded ones use speculative sampling, whose acceptance is higher.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.decoding.ar import ar_emit, ar_request
from engine.decoding.base import Decoder, DecoderContext, Outcome
from engine.decoding.costs import ForwardCosts, clock_for, measure
from engine.decoding.modes import AUTO_ITERATIONS
from engine.decoding.spec import SelfSpec, SpecState
from engine.forward import Forward, ForwardRequest
from engine.logits_processing import choose_next, process
from engine.sampling import keyed_gumbel, keyed_pick
from engine.sequence import SamplingParams, Sequence

log = logging.getLogger("trimode.engine")

AR, SPEC = "ar", "self_spec"
Choice = tuple[str, int]  # (AR, 0) or (SPEC, block length)
_AR_CHOICE: Choice = (AR, 0)
_AR_COUNTER = AUTO_ITERATIONS[AR]
_SPEC = SelfSpec()
DEFAULT_ALPHA = {"greedy": 0.6, "sampled": 0.35}  # no measured acceptance: a guess that spec must earn its keep
_POOL_WEIGHT = 4.0  # pseudo-rounds the engine-wide estimate starts with
# per round: the engine-wide estimate follows about the last 200 rounds. 50 (0.98) are the tails of the last few
# requests, and the estimate swung with them: after 48 greedy self_spec requests at concurrency 16 it read alpha
# 0.76 (0.80 at 0.995), and auto then decoded 1.29 tokens per step at concurrency 1 where self_spec made 2.85 (1.91
# at 0.995; offline, held-out prompts)
_POOL_DECAY = 0.995
_SEQ_WEIGHT = 2.0  # pseudo-rounds a sequence's estimate starts with (from the engine-wide one)
_SEQ_DECAY = 0.7  # per round: a sequence's estimate follows its last few rounds
_RELAX = 0.03  # per ar iteration: a sequence's estimate moves this far towards the engine-wide one
_SHRINK = 0.5  # pseudo-rounds of the engine-wide estimate in a sequence's planning estimate
_REPLAN = 8  # engine steps one batch plan serves
_AR_HOLD = 4  # ar iterations a decision for ar covers (deciding per token would cost more than it could gain)
_REMEMBER = 1024  # preempted sequences whose estimates are kept for their return


def keyed(params: SamplingParams) -> bool:
    """Whether an auto request's rounds are keyed (seeded sampling; see the module docstring)."""
    return params.seed is not None and params.temperature > 0


def rule_of(params: SamplingParams, keyed_rounds: bool) -> tuple[str, bool]:
    """The acceptance class of a request's rounds: (greedy | sampled | keyed, drafting by threshold)."""
    kind = "greedy" if params.temperature == 0 else "keyed" if keyed_rounds else "sampled"
    return kind, params.threshold is not None


def expected_accepted(alpha: float, k: int) -> float:
    """Expected drafts kept out of k when each is kept with probability alpha given the ones before it."""
    if k <= 0:
        return 0.0
    if alpha >= 1.0 - 1e-9:
        return float(k)
    return alpha * (1.0 - alpha ** k) / (1.0 - alpha)


_GRID = 200  # alpha grid of `alpha_for`'s tables


@functools.lru_cache(maxsize=256)
def _expected_table(k: int) -> tuple[float, ...]:
    return tuple(expected_accepted(i / _GRID, k) for i in range(_GRID + 1))


def alpha_for(tokens_per_iteration: float, block_length: float) -> float:
    """The alpha that makes a round of `block_length` yield `tokens_per_iteration` (kept drafts + 1) on average
    (interpolated in a table per draft count: it runs once per round and per ar iteration of every sequence)."""
    k = max(1, round(block_length - 1))
    table = _expected_table(k)
    target = min(max(tokens_per_iteration - 1.0, 0.0), float(k))
    i = min(bisect.bisect_left(table, target), _GRID)
    if i == 0:
        return 0.0
    lo, hi = table[i - 1], table[i]
    return (i - 1 + (target - lo) / (hi - lo if hi > lo else 1.0)) / _GRID


@dataclass
class Acceptance:
    """Discounted sums of drafts kept and drafts checked per round. alpha is the per-draft keep chance whose
    geometric model reproduces the mean kept at the mean drafted: matching the mean, not counting kept and rejected
    positions, keeps the estimate unbiased when acceptance comes in bursts (all or nothing), as it does along a
    repetitive greedy continuation. The geometric model then only carries the estimate to other draft lengths."""

    kept: float
    drafted: float
    weight: float
    decay: float
    alpha: float = 0.0

    @classmethod
    def seeded(cls, alpha: float, drafts: int, weight: float, decay: float) -> Acceptance:
        return cls(expected_accepted(alpha, drafts) * weight, float(drafts) * weight, weight, decay, alpha)

    def _refit(self) -> None:
        k = self.drafted / max(self.weight, 1e-9)
        self.alpha = alpha_for(1.0 + self.kept / max(self.weight, 1e-9), k + 1.0) if k >= 1 else self.alpha

    def update(self, accepted: int, drafted: int) -> None:
        """One round kept `accepted` of `drafted` drafts."""
        self.kept = self.kept * self.decay + accepted
        self.drafted = self.drafted * self.decay + drafted
        self.weight = self.weight * self.decay + 1.0
        self._refit()


@dataclass(frozen=True)
class AcceptancePrior:
    """alpha per rule before anything is measured, and where it came from."""

    greedy: float
    sampled: float
    source: str
    block_length: int = 16  # the block length the figures were measured at

    @classmethod
    def from_checkpoint(cls, path: str | Path | None) -> AcceptancePrior:
        """From the model card's `figures.json` (trimode's cards: self_spec tokens per iteration, greedy and
        sampled, at the card's block size), else the defaults."""
        figures = Path(path) / "figures.json" if path else None
        try:
            raw = json.loads(figures.read_text()) if figures is not None and figures.is_file() else None
            block = int(raw["block_size"]) if raw else 0
            greedy = alpha_for(float(raw["self_spec"]["accepted_per_iteration"]), block) if raw else None
            sampled = alpha_for(float(raw["self_spec_t0.8"]["accepted_per_iteration"]), block) if raw else None
        except (KeyError, TypeError, ValueError, OSError):
            greedy = sampled = None
        if greedy is None or sampled is None:
            return cls(DEFAULT_ALPHA["greedy"], DEFAULT_ALPHA["sampled"], "defaults")
        return cls(greedy, sampled, str(figures), block)

    def alpha(self, rule: tuple[str, bool]) -> float:
        return self.greedy if rule[0] == "greedy" else self.sampled


@dataclass
class AutoState:
    """One auto sequence's decoding state (`seq.state`)."""

    est: Acceptance
    current: Choice | None = None  # what the sequence runs while the plan does not move it
    streak: int = 0  # consecutive decisions whose plan wanted another choice
    choice: Choice | None = None  # this iteration's choice, from the decision until its last forward is consumed
    round: SpecState | None = None
    hold: int = 0  # ar iterations still to run before the next decision
    ar_since_round: int = 0  # ar iterations since the last round (the estimate relaxes towards the engine's)
    ar_iterations: int = 0
    rounds: dict[int, int] = field(default_factory=dict)  # block length -> self_spec rounds run


Group = tuple[Forward, int, int]  # (kind, block length, diffusion steps): what one forward of today's engine runs


@dataclass
class _Load:
    """What the fixed-mode sequences of the batch cost and yield, per cycle (grouped) and per step (merged)."""

    groups: dict[Group, list[float]] = field(default_factory=dict)  # -> [sequences, rows]
    reps: dict[Group, float] = field(default_factory=dict)  # forwards of the group per cycle (threshold drafts > 1)
    cycle_tokens: float = 0.0
    parts: dict[Forward, list[float]] = field(default_factory=dict)  # kind -> [rows] per step
    step_tokens: float = 0.0
    rates: list[tuple[float, float]] = field(default_factory=list)  # (tokens left, tokens per step) per sequence


def _add(table: dict, key, *values: float) -> None:
    row = table.setdefault(key, [0.0] * len(values))
    for i, v in enumerate(values):
        row[i] += v


class AutoPlanner:
    """One engine's cost model, acceptance estimates and batch plan for `auto` (see the module docstring)."""

    def __init__(self, costs: ForwardCosts, prior: AcceptancePrior, block_lengths: tuple[int, ...], *,
                 margin: float = 0.1, patience: int = 2, merged: bool = False, clock=time.perf_counter) -> None:
        if not block_lengths or min(block_lengths) < 2:
            raise ValueError(f"auto: block lengths must be >= 2, got {block_lengths}")
        self.costs = costs
        self.prior = prior
        self.block_lengths = tuple(sorted(set(block_lengths)))
        self.margin = margin
        self.patience = patience
        self.merged = merged  # one forward per step for every sequence (learned from the steps when not given)
        self.clock = clock  # what the engine times its steps with (`engine.decoding.costs.clock_for`)
        self.pools: dict[tuple[str, bool], Acceptance] = {}
        self.draft_forwards: dict[tuple[str, bool], float] = {}  # per rule: EMA of draft forwards per round
        self.running: list[Sequence] = []  # the engine's running sequences (the live list, from `observe`)
        self.waiting = 0  # requests waiting for a place in the batch at the last step (0: the batch is draining)
        self.steps = 0
        self._last_step_end: float | None = None  # `clock` at the end of the previous step
        self._plan: dict[str, Choice] | None = None
        self._plan_step = -1

    # ---- engine hooks ------------------------------------------------------------------------------------------
    def observe(self, requests: list[ForwardRequest], seconds: float, running: list[Sequence],
                waiting: int = 0) -> None:
        """After every engine step: the forward requests it ran and how long the step took (forward and decoders'
        work), the engine's running sequences and how many requests wait for a place among them."""
        self.running = running
        self.waiting = waiting
        self.steps += 1
        now = self.clock()
        if self._last_step_end is not None:
            between = now - self._last_step_end - seconds
            # back-to-back steps only: a longer gap is the engine waiting for work (wall clock on a GPU)
            if 0 <= between < 2 * seconds + 0.002:
                self.costs.observe_overhead(between)
        self._last_step_end = now
        decode = [r for r in requests if r.forward != Forward.PREFILL]
        kinds = {r.forward for r in decode}
        if len(kinds) > 1:
            self.merged = True
        if not decode or len(decode) != len(requests) or seconds <= 0:
            return  # prefill rows riding along would be priced as decode rows; such steps teach nothing clean
        if self.merged:
            parts: dict[Forward, float] = {}
            for r in decode:
                parts[r.forward] = parts.get(r.forward, 0) + len(r.token_ids)
            self.costs.observe_merged(parts, seconds)
        else:
            self.costs.observe(decode[0].forward, sum(len(r.token_ids) for r in decode), seconds)

    def learn(self, params: SamplingParams, keyed_rounds: bool, accepted: int, drafted: int,
              draft_forwards: int) -> None:
        """A self-speculation round (self_spec or auto) kept `accepted` of `drafted` drafts."""
        if drafted <= 0:
            return
        rule = rule_of(params, keyed_rounds)
        self._pool(rule).update(accepted, drafted)
        old = self.draft_forwards.get(rule, 1.0)
        self.draft_forwards[rule] = old * 0.9 + draft_forwards * 0.1

    # ---- sequences -----------------------------------------------------------------------------------------------
    def _pool(self, rule: tuple[str, bool]) -> Acceptance:
        pool = self.pools.get(rule)
        if pool is None:
            pool = self.pools[rule] = Acceptance.seeded(self.prior.alpha(rule), self.prior.block_length - 1,
                                                        _POOL_WEIGHT, _POOL_DECAY)
        return pool

    def new_state(self, seq: Sequence) -> AutoState:
        """A fresh state for an auto sequence, its estimate seeded from the engine-wide one."""
        pool = self._pool(rule_of(seq.params, keyed(seq.params)))
        return AutoState(Acceptance.seeded(pool.alpha, round(pool.drafted / pool.weight), _SEQ_WEIGHT, _SEQ_DECAY))

    # ---- the decision ------------------------------------------------------------------------------------------
    def decide(self, seq: Sequence, st: AutoState) -> Choice:
        """This iteration's choice for `seq`: the plan's target, after hysteresis."""
        if self._left(seq) <= 1:
            return _AR_CHOICE  # one token left: a round would draft nothing
        if st.hold > 0 and st.current == _AR_CHOICE:
            st.hold -= 1
            return _AR_CHOICE
        plan = self._current_plan(seq)
        target = plan.get(seq.request_id, _AR_CHOICE)
        if st.current is None or st.current == target:
            st.current, st.streak = target, 0
        else:
            st.streak += 1
            if st.streak >= self.patience:
                st.current, st.streak = target, 0
        if st.current[0] == SPEC and st.current[1] > (seq.params.block_length or 0):
            st.current = _AR_CHOICE  # never beyond the request's bound (cannot happen through the plan)
        if st.current == _AR_CHOICE:
            st.hold = _AR_HOLD - 1
        return st.current

    @staticmethod
    def _left(seq: Sequence) -> int:
        return seq.params.max_tokens - seq.num_output_tokens

    def _current_plan(self, seq: Sequence) -> dict[str, Choice]:
        # a plan serves `_REPLAN` steps (sequences decide every iteration; re-planning each step would cost more
        # than the forwards of a small model), or until a sequence it has not seen asks
        if self._plan is None or self.steps - self._plan_step >= _REPLAN or seq.request_id not in self._plan:
            # sequences still in prefill count as the decoders they are about to be: a batch filling up after a
            # burst of arrivals is planned as the batch it will be, not as the few that finished their prefill
            population = [s for s in self.running if s.params.mode == "auto"]
            if all(s is not seq for s in population):
                population.append(seq)
            self._plan = self.plan(population)
            self._plan_step = self.steps
        return self._plan

    def _alpha(self, seq: Sequence) -> float:
        """A sequence's alpha for planning: its own estimate shrunk towards the engine-wide one by `_SHRINK`
        pseudo-rounds, so one lucky round does not pull a sequence (or, through it, the whole batch) into rounds
        it will not keep paying for."""
        pool = self._pool(rule_of(seq.params, keyed(seq.params)))
        st = seq.state
        if not isinstance(st, AutoState):
            return pool.alpha
        # a sequence decoding ar learns nothing about its acceptance: its estimate relaxes towards the engine's
        # (so it is tried again some time, rather than frozen at its last rounds)
        relaxed = 1.0 - (1.0 - _RELAX) ** st.ar_since_round
        alpha = st.est.alpha + (pool.alpha - st.est.alpha) * relaxed
        return (alpha * st.est.weight + pool.alpha * _SHRINK) / (st.est.weight + _SHRINK)

    def _rounds_per_draft(self, params: SamplingParams) -> float:
        return max(1.0, self.draft_forwards.get(rule_of(params, keyed(params)), 1.0))

    def _fixed_load(self) -> _Load:
        load = _Load()
        for s in self.running:
            p = s.params
            if p.mode == "auto":
                continue
            block = p.block_length or 2
            rate = 1.0
            if p.mode == "ar":
                _add(load.groups, (Forward.AR_DECODE, 0, 0), 1, 1)
                load.reps[(Forward.AR_DECODE, 0, 0)] = 1
                load.cycle_tokens += 1
                _add(load.parts, Forward.AR_DECODE, 1)
            elif p.mode == "self_spec":
                d = self._rounds_per_draft(p)
                e = expected_accepted(self._pool(rule_of(p, False)).alpha, block - 1)
                for kind, reps in ((Forward.DRAFT, d), (Forward.VERIFY, 1.0)):
                    _add(load.groups, (kind, block, 0), 1, block)
                    load.reps[(kind, block, 0)] = max(load.reps.get((kind, block, 0), 1.0), reps)
                load.cycle_tokens += 1 + e
                _add(load.parts, Forward.DRAFT, block * d / (d + 1))
                _add(load.parts, Forward.VERIFY, block / (d + 1))
                rate = (1 + e) / (d + 1)
            else:  # diffusion: a denoise group each cycle, about one token per forward on small models
                key = (Forward.DENOISE, block, p.steps or block)
                _add(load.groups, key, 1, block)
                load.reps[key] = 1
                load.cycle_tokens += 1
                _add(load.parts, Forward.DENOISE, block)
            load.step_tokens += rate
            load.rates.append((float(self._left(s)), rate))
        return load

    def throughput(self, load: _Load, n_ar: int, spec: dict[int, tuple[float, float, float]]) -> float:
        """Predicted output tokens per second with the fixed `load`, `n_ar` auto sequences in ar and, per block
        length L, spec[L] = (sequences, sum of their expected kept drafts, draft forwards per round)."""
        costs = self.costs
        if self.merged:
            parts = {k: v[0] for k, v in load.parts.items()}
            tokens = load.step_tokens + n_ar
            parts[Forward.AR_DECODE] = parts.get(Forward.AR_DECODE, 0.0) + n_ar
            for length, (m, kept, d) in spec.items():
                parts[Forward.DRAFT] = parts.get(Forward.DRAFT, 0.0) + m * length * d / (d + 1)
                parts[Forward.VERIFY] = parts.get(Forward.VERIFY, 0.0) + m * length / (d + 1)
                tokens += (m + kept) / (d + 1)
            seconds = costs.merged_seconds(parts)
        else:
            groups = {k: list(v) for k, v in load.groups.items()}
            reps = dict(load.reps)
            tokens = load.cycle_tokens + n_ar
            if n_ar:
                _add(groups, (Forward.AR_DECODE, 0, 0), n_ar, n_ar)
                reps[(Forward.AR_DECODE, 0, 0)] = 1
            for length, (m, kept, d) in spec.items():
                if m <= 0:
                    continue
                for kind, r in ((Forward.DRAFT, d), (Forward.VERIFY, 1.0)):
                    _add(groups, (kind, length, 0), m, m * length)
                    reps[(kind, length, 0)] = max(reps.get((kind, length, 0), 1.0), r)
                tokens += m + kept
            seconds = sum(reps[g] * costs.seconds(g[0], rows) for g, (n, rows) in groups.items() if n > 0)
        return tokens / seconds if seconds > 0 else 0.0

    def plan(self, members: list[Sequence]) -> dict[str, Choice]:
        """Target choice per auto sequence (by request id) for the running batch (see the module docstring)."""
        load = self._fixed_load()
        left = {s.request_id: self._left(s) for s in members}
        alpha = {s.request_id: self._alpha(s) for s in members}
        d_of = {s.request_id: self._rounds_per_draft(s.params) for s in members}
        n = len(members)

        def kept(s: Sequence, length: int) -> float:
            rid = s.request_id
            if length > (s.params.block_length or 0) or left[rid] <= 1:
                return -1.0  # not eligible for a round of this length
            return expected_accepted(alpha[rid], min(length - 1, left[rid] - 1))

        def score(n_ar: int, spec: dict[int, tuple[float, float, float]], choice: dict[str, Choice]) -> float:
            thr = self.throughput(load, n_ar, spec)
            if self.waiting:
                return thr
            rates = [(float(left[s.request_id]), 1.0 if c[0] == AR else
                      (1.0 + kept(s, c[1])) / (d_of[s.request_id] + 1.0))
                     for s in members for c in (choice.get(s.request_id, _AR_CHOICE),)]
            return thr * _drain_efficiency(load.rates + rates)

        best: tuple[float, int, int, list[Sequence]] = (score(n, {}, {}), 0, 0, [])
        for length in self.block_lengths:
            ranked = sorted(((kept(s, length), s) for s in members), key=lambda es: -es[0])
            eligible = [(e, s) for e, s in ranked if e >= 0]
            step = max(1, len(eligible) // 16)
            total, d_sum = 0.0, 0.0
            for m in range(1, len(eligible) + 1):
                e, s = eligible[m - 1]
                total += e
                d_sum += d_of[s.request_id]
                if m % step and m != len(eligible):
                    continue
                thr = score(n - m, {length: (m, total, d_sum / m)},
                            {s.request_id: (SPEC, length) for _, s in eligible[:m]})
                if thr > best[0]:
                    best = (thr, length, m, [s for _, s in eligible[:m]])
        _, length, _, chosen = best
        ids = {s.request_id for s in chosen}
        targets = {s.request_id: ((SPEC, length) if s.request_id in ids else _AR_CHOICE) for s in members}
        # hysteresis: keep the running assignment unless the best plan beats it by the margin
        current: dict[str, Choice] = {}
        for s in members:
            st = s.state if isinstance(s.state, AutoState) else None
            cur = st.current if st is not None and st.current is not None else targets[s.request_id]
            if cur[0] == SPEC and kept(s, cur[1]) < 0:
                cur = _AR_CHOICE
            current[s.request_id] = cur
        if current == targets:
            return targets
        spec: dict[int, list[float]] = {}
        n_ar = 0
        for s in members:
            cur = current[s.request_id]
            if cur[0] == AR:
                n_ar += 1
            else:
                _add(spec, cur[1], 1, kept(s, cur[1]), d_of[s.request_id])
        cur_thr = score(n_ar, {k: (v[0], v[1], v[2] / v[0]) for k, v in spec.items()}, current)
        return targets if best[0] > cur_thr * (1 + self.margin) else current


def _drain_efficiency(rates: list[tuple[float, float]]) -> float:
    """How much of a plan's steady-state throughput a batch that nothing waits to join gets: each (tokens left,
    tokens per step) sequence leaves when done, and nobody takes its place, so the batch's output until the last
    one leaves is (tokens left in all) / (steps until the slowest is done), against (tokens per step) while all
    run. 1 when all would finish together; a plan that speeds a few sequences while every step grows costlier for
    the rest scores lower (its fast ones leave early and their rows' cost bought nothing the batch keeps)."""
    live = [(left, rate) for left, rate in rates if left > 0 and rate > 0]
    if not live:
        return 1.0
    steps = max(left / rate for left, rate in live)
    return sum(left for left, _ in live) / sum(rate for _, rate in live) / steps


class AutoDecoder(Decoder):
    """Delegates each iteration to the `ar` step or a `self_spec` round, as the engine's planner decides."""

    def __init__(self) -> None:
        # preempted sequences' states, by object (a preemption must leave `seq.state` None; the estimates need not
        # be lost): id -> (weak reference, state); a dead reference or the size bound drops an entry
        self._parked: OrderedDict[int, tuple[weakref.ref, AutoState]] = OrderedDict()

    def next_forward(self, seq: Sequence, ctx: DecoderContext) -> ForwardRequest:
        st = seq.state
        if st is None:
            parked = self._parked.pop(id(seq), None)
            if parked is not None and parked[0]() is seq:
                st = seq.state = parked[1]
            else:
                st = seq.state = ctx.auto.new_state(seq) if ctx.auto is not None else \
                    AutoState(Acceptance.seeded(0.0, 1, 1.0, 1.0))
        if st.choice is None:
            st.choice = ctx.auto.decide(seq, st) if ctx.auto is not None else _AR_CHOICE
        if st.choice[0] == AR:
            return ar_request(seq)
        if st.round is None:
            st.round = _SPEC.begin(seq, ctx, st.choice[1], keyed=keyed(seq.params))
        return _SPEC.request(st.round, ctx)

    def outcome_from_logits(self, seq: Sequence, req: ForwardRequest, logits: torch.Tensor,
                            ctx: DecoderContext) -> Outcome:
        st: AutoState = seq.state
        if req.forward == Forward.AR_DECODE:
            rows, forced = logits[-1:], req.token_ids[1:]  # (tokens its grammar forced: engine.decoding.ar)
            if keyed(seq.params):
                noise = keyed_gumbel(seq.params.seed, [len(seq.token_ids) + len(forced)],  # type: ignore[arg-type]
                                     rows.shape[-1])
                tokens = keyed_pick(process(rows, seq, [tuple(forced)]), seq.params, ctx.mask_id, noise).tolist()
            else:
                tokens = choose_next(rows, seq, ctx.mask_id, after=forced)
            st.choice = None
            st.ar_iterations += 1
            st.ar_since_round += 1
            return ar_emit(tokens, seq, req, logits, ctx, counters={_AR_COUNTER: 1})
        assert st.round is not None
        done = _SPEC.advance(st.round, seq, req, logits, ctx)
        if done is None:
            return Outcome([])
        st.rounds[st.round.block_length] = st.rounds.get(st.round.block_length, 0) + 1
        st.round, st.choice, st.ar_since_round = None, None, 0
        # the sequence's own estimate learns; the engine-wide one does not: auto ran this round because the
        # estimate said it would pay, so such rounds are a biased sample (learning from all of them biased it
        # upwards and every sequence relaxing towards it was tried again in vain; learning from first rounds only,
        # which come where outputs are least repetitive, biased it downwards until auto stopped speculating)
        if done.drafted:  # (a forced round drafts nothing: engine.decoding.spec)
            st.est.update(done.accepted, done.drafted)
        done.outcome.counters[AUTO_ITERATIONS[SPEC]] = 1
        return done.outcome

    def reset_for_recompute(self, seq: Sequence) -> bool:
        # an ar step or a round in flight emitted nothing yet, so the recompute owes no token; the sequence's
        # estimates and current choice wait for it to come back
        st = seq.state
        if isinstance(st, AutoState):
            st.round, st.choice = None, None
            self._parked[id(seq)] = (weakref.ref(seq), st)
            while len(self._parked) > _REMEMBER:
                self._parked.popitem(last=False)
        seq.state = None
        return False

    def describe(self, seq: Sequence) -> str | None:
        st = seq.state
        if not isinstance(st, AutoState):
            return "ar:0"
        return ",".join([f"{AR}:{st.ar_iterations}"] + [f"{SPEC}/{k}:{v}" for k, v in sorted(st.rounds.items())])


def build_planner(runner, blocks, *, mask_id: int, spec_lora: bool, block_lengths: tuple[int, ...], main_block: int,
                  max_num_seqs: int, max_num_batched_tokens: int, checkpoint: str | None,
                  budget_s: float = 3.0) -> AutoPlanner:
    """Measure this engine's forward costs (a few seconds) and read the checkpoint's acceptance: `auto`'s planner."""
    from engine.batch import Batch

    clock = clock_for(runner.device.type)
    costs = measure(runner, blocks, spec_lora, mask_id, block_lengths, main_block, max_num_seqs, budget_s=budget_s,
                    max_rows=max_num_batched_tokens, clock=clock)
    prior = AcceptancePrior.from_checkpoint(checkpoint)
    log.info("auto: acceptance prior alpha greedy %.2f, sampled %.2f (%s)", prior.greedy, prior.sampled,
             prior.source)
    # an engine whose Batch has sections runs every sequence's forward in one forward per step
    merged = "sections" in getattr(Batch, "__dataclass_fields__", {})
    return AutoPlanner(costs, prior, block_lengths, merged=merged, clock=clock)


def planner_for_engine(runner, blocks, policy, config, checkpoint: str, mask_id: int | None,
                       spec_lora: bool) -> AutoPlanner | None:
    """The engine's `auto` planner; None on a plain causal checkpoint (there `auto` is `ar`)."""
    if not policy.is_trimode or mask_id is None:
        return None
    return build_planner(runner, blocks, mask_id=mask_id, spec_lora=spec_lora,
                         block_lengths=policy.allowed_block_lengths, main_block=policy.default_block_length,
                         max_num_seqs=config.max_num_seqs,
                         max_num_batched_tokens=config.max_num_batched_tokens, checkpoint=checkpoint)
