"""`self_spec`: linear self-speculation, as the reference `linear_spec_generate`, batched, with lossless
speculative sampling at temperature > 0, and rounds over drafts an earlier draft forward left over.

Each round is two forwards over `[seed, d1 ... dk]` (k = L - 1, fewer near `max_tokens`): a bidirectional
read-only draft (draft LoRA on when the checkpoint ships one) that fills the masks, then a causal verify that
writes K/V and gives p_i, the AR distribution of draft position i given the context and d_1 .. d_{i-1}. The c
drafts kept and one more token are emitted; the seed + c drafts stay committed, the rejected K/V is cropped and the
last token becomes the next seed. Which drafts are kept, by temperature and drafting (every rule is exact: the
emitted tokens follow the AR distribution, so greedy output equals greedy `ar` token for token):

- T = 0: argmax drafts; keep while d_i == argmax p_i; then argmax p (the AR token).
- T > 0, one draft forward (no `threshold`): d_i ~ q_i, the draft distribution after the request's temperature,
  top-k and top-p, every position drawn independently; keep d_i with probability min(1, p_i(d_i) / q_i(d_i)); at
  the first rejection emit a draw from norm(max(0, p_i - q_i)), and if all are kept the bonus from p.
- T > 0 with `threshold` (several draft forwards, committed out of order): argmax drafts (a one-hot q); keep d_i
  with probability p_i(d_i); at the first rejection emit a draw from p_i without d_i, else the bonus from p.
- keyed rounds (`auto`'s seeded requests at T > 0): drafts argmax(log q_i + g_i); keep while d_i == argmax(log p_i
  + g_i); then argmax(log p + g).

Under a grammar, the first drafts of a round are the tokens it forces after the seed (`engine.grammar`: the
`", "name": "` between two JSON fields), and the draft forward fills only the masks after them, seeing them; a
block the grammar fills alone skips the draft forward. Forced drafts come from a deterministic drafter (a one-hot
q), and every verify row at them keeps that token alone, so they are always kept; the acceptance counters leave
them out (they count in `grammar_forced_tokens`). Putting them in the block rather than verifying them by
themselves saves a forward: a round of its own would cost one forward for m + 1 tokens, and the draft/verify round
after it two more.

Speculative sampling needs d_i drawn from q_i independently of d_<i and of the earlier coins, which a one-shot
draft gives (every position is drawn from the context alone). Threshold drafting commits positions out of order
over several forwards, so d_i may depend on later drafts; with argmax drafts the drafter is deterministic given the
context, and a one-hot q is exact for any deterministic drafter. Keyed rounds use the noise g_i of the token's
absolute position and the request's seed (`engine.sampling.keyed_gumbel`): the output token of a position is
argmax(log p + g) whoever drafted, which makes an `auto` request's seeded output independent of its ar / self_spec
choices. Every random draw comes from the sequence's own generator (or its seed), so seeded requests are
reproducible and independent of the batch.

Leftover drafts (self_spec's own rounds; not under `auto`, whose planner prices rounds itself). A round rejected at
draft c + 1 < k emits its token at that position; the drafts d_{c+2} .. d_k its draft forward made are still
proposals for the very positions that follow, so the next round may verify `[new seed, d_{c+2} .. d_k]` (with their
q rows) in one forward, without a draft forward of its own. It is exact by the argument above: a one-shot draft drew
d_{c+2} .. d_k from the old context alone, independently of d_{c+1}, of the coins and of the residual draw that
ended the round, so given everything the new round's acceptance can depend on they are still draws from their q rows
(a q computed from less context than p sees is still a valid q: speculative sampling is exact for any q the drafts
were drawn from). At T = 0 any drafts are exact (greedy verification emits argmax p whatever it checks), so greedy
rounds reuse leftovers from every drafter, under logits controls and grammars too: there the tokens the grammar
forces after the new seed take their positions from the leftovers, and the leftovers it refuses after them are cut,
as in a fresh round. At T > 0 only one-shot sampled drafts without logits controls or a grammar are reused: drafts
drawn one by one under them were drawn after the rejected d_{c+1}, and a grammar cut of a sampled draft would draw
the bonus from p where the residual is due; nor threshold drafting or keyed rounds. Where greedy drafts are good,
reuse changes little (free prose on the built-in model: 2.68 tokens per decode forward with it, 2.69 without,
`python -m bench.spec_acceptance --temperatures 0`; 1866 fresh rounds kept 6.4 drafts each, 3156 reused ones 0.40: a
sequence tries reuse in its poorer stretches); where they are poor it saves the draft forward (under the JSON schema
of `python -m bench.structured`, which keeps 0.02-0.06 of the drafts, self_spec's output tok/s went from 75 % / 66 %
of unconstrained at batch 1 / 8 to 160 % / 93 %). Whether to reuse is the sequence's own choice from its tally
(`Tally.reuse_pays`): a reused round makes 1 + E' tokens in one forward, a fresh one 1 + E in two, E and E' the mean
drafts kept by its rounds of each kind. At T = 1 on the built-in model E is about 0.9 (under one token per forward)
and E' about 0.33, so nearly every round that can reuse does: tokens per decode forward 1.27 against 0.98 (T = 0.7:
1.20 against 1.01). The choice depends on the sequence's past alone, so it changes neither what is emitted nor a
seeded request's independence of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.decoding.base import Decoder, DecoderContext, Outcome, emit_tokens
from engine.decoding.diffusion import commit_count
from engine.decoding.modes import GRAMMAR_FORCED_TOKENS, SPEC_ACCEPTED_TOKENS, SPEC_DRAFT_TOKENS, SPEC_DRAFTS
from engine.forward import BatchKey, Forward, ForwardRequest
from engine.grammar import GrammarProcessor, forced_tokens, grammar_of
from engine.logits_processing import committed_prefixes, greedy_chain, process
from engine.sampling import (
    exclude,
    greedy,
    keyed_gumbel,
    keyed_pick,
    probabilities,
    speculative_verify,
)
from engine.sequence import Sequence

# each round weighs this much less than the one after it in a sequence's tally: acceptance comes in stretches (a
# JSON value's keys, then its free text; prose, then a loop), which a lifetime mean follows slowly (auto's acceptance
# estimate is a moving average for the same reason)
TALLY_DECAY = 0.7


@dataclass
class Tally:
    """A sequence's own rounds so far, by where their drafts came from, the older ones weighing less (TALLY_DECAY
    per round): what the choice to reuse drafts weighs."""

    fresh_rounds: float = 0.0  # rounds that ran a draft forward
    fresh_accepted: float = 0.0
    reused_rounds: float = 0.0  # rounds over drafts left over from an earlier draft forward (no draft forward)
    reused_accepted: float = 0.0

    def add(self, reused: bool, accepted: int) -> None:
        d = TALLY_DECAY
        self.fresh_rounds, self.fresh_accepted = d * self.fresh_rounds, d * self.fresh_accepted
        self.reused_rounds, self.reused_accepted = d * self.reused_rounds, d * self.reused_accepted
        if reused:
            self.reused_rounds += 1
            self.reused_accepted += accepted
        else:
            self.fresh_rounds += 1
            self.fresh_accepted += accepted

    def reuse_pays(self) -> bool:
        """A reused round makes 1 + E' tokens in one forward, a fresh one 1 + E in two: reuse when the first is
        larger. E: the mean drafts kept by this sequence's fresh rounds; E': the same for its reused rounds, with
        one pseudo-round at E (leftover drafts come from the same draft forward as fresh ones but saw less of the
        context, so E is the optimistic guess), which lets an unlucky first reused round not rule reuse out for
        good: a choice that only ever tried one option would never learn the other's worth (and once a sequence has
        stopped reusing, its reused rounds fade from the tally until the pseudo-round has it try again). Tokens per
        decode forward on the built-in model (`python -m bench.spec_acceptance`, pooled): 1.27 at T = 1.0 and 1.20 at
        T = 0.7, against 1.25 and 1.17 with a plain mean of E' that tries reuse once; never reusing makes 1.32 at
        T = 0.3 (this rule 1.36) and 2.11 at T = 0.1 (this rule 2.10: near greedy the trial rounds cost a little).
        Without the decay the rule made 1.27, 1.19, 1.40 and 2.10, and 2.68 greedy (2.60 with it), yet greedy prose
        ran 1.05x / 1.04x as many tok/s with it at batch 1 / 8 (its reused rounds verify fewer rows than a fresh
        round's two forwards); under the JSON schema of `python -m bench.structured` at batch 8 its forwards carry
        2533 query rows in 51 steps, against 2596 in 51 without it. Both choices emit the same tokens."""
        e = self.fresh_accepted / max(self.fresh_rounds, 1e-9)  # a round that can reuse follows a fresh one
        e_reused = (self.reused_accepted + e) / (self.reused_rounds + 1)
        return 1.0 + e_reused > (1.0 + e) / 2.0


@dataclass
class SpecState:
    # [seed, d1 ... dk]; masks while drafting. Between self_spec's own rounds: [] (a fresh round is next) or
    # [mask, leftover drafts] (a reused round; `next_forward` puts the seed in once the last round's token is known)
    block: list[int]
    block_length: int  # this round's L (the batching key)
    start: int  # absolute index of the token after the seed (the first verify row's position)
    drafted: bool = False
    keyed: bool = False  # a keyed round (see the module docstring)
    q: torch.Tensor | None = None  # one-shot sampled drafts: the q_i rows [k, V]; None = deterministic drafts
    noise: torch.Tensor | None = None  # keyed rounds: Gumbel rows of positions start .. start + k, made once
    draft_forwards: int = 0
    reused: bool = False  # drafts left over from an earlier round's draft forward; block[0] is set when it runs
    tally: Tally | None = None  # the sequence's rounds before this one (self_spec's own rounds; None under auto)
    forced: int = 0  # the first drafts are tokens the grammar forces, not the draft forward's (module docstring)


@dataclass(frozen=True, slots=True)
class RoundResult:
    """What a finished round did: its Outcome, and the acceptance figures `auto` learns from."""

    outcome: Outcome
    kept: int  # every draft kept, forced ones too: the round's token stands at block[kept + 1]
    accepted: int  # the model's drafts kept (the grammar's forced ones left out, as in the counters)
    drafted: int  # the model's drafts checked
    draft_forwards: int


class SelfSpec(Decoder):
    # ---- the round as steps over an explicit state (`auto` drives the same rounds with its own block length) ----
    @staticmethod
    def begin(seq: Sequence, ctx: DecoderContext, block_length: int, keyed: bool = False) -> SpecState:
        """A new round of `block_length` over `seq`'s newest token; never drafts past `max_tokens` (k drafts +
        the token after them give at most k + 1 tokens)."""
        k = max(0, min(block_length - 1, seq.params.max_tokens - seq.num_output_tokens - 1))
        forced = forced_tokens(seq, k)
        return SpecState([seq.token_ids[-1]] + forced + [ctx.mask_id] * (k - len(forced)), block_length,
                         len(seq.token_ids), drafted=len(forced) == k, keyed=keyed, forced=len(forced))

    @staticmethod
    def request(st: SpecState, ctx: DecoderContext) -> ForwardRequest:
        if not st.drafted:
            key = BatchKey(Forward.DRAFT, draft_lora=ctx.spec_lora, block_length=st.block_length)
            return ForwardRequest(key, list(st.block), all_logits=True)
        return ForwardRequest(BatchKey(Forward.VERIFY, block_length=st.block_length), list(st.block),
                              all_logits=True)

    def advance(self, st: SpecState, seq: Sequence, req: ForwardRequest, logits: torch.Tensor,
                ctx: DecoderContext) -> RoundResult | None:
        """Consume one forward of the round; the RoundResult once the verify has run, None while drafting."""
        if req.forward == Forward.DRAFT:
            self._draft(st, seq, logits, ctx)
            return None
        return self._verify(st, seq, logits, ctx)

    # ---- the mode's own decoder interface ----
    def next_forward(self, seq: Sequence, ctx: DecoderContext) -> ForwardRequest:
        assert seq.params.block_length is not None
        st: SpecState | None = seq.state
        if st is None or not st.block:  # a new round (the placeholder `_next_round` left carries the tally)
            tally = st.tally if st is not None and st.tally is not None else Tally()
            st = seq.state = self.begin(seq, ctx, seq.params.block_length)
            st.tally = tally
        elif st.reused and st.block[0] == ctx.mask_id:  # leftover drafts: the seed is the token the last round made
            k = min(len(st.block) - 1, seq.params.max_tokens - seq.num_output_tokens - 1)
            st.block = [seq.token_ids[-1]] + st.block[1:k + 1]
            st.q = st.q[:k] if st.q is not None else None
            if (grammar := grammar_of(seq)) is not None:  # greedy only (see `_next_round`)
                # tokens the grammar forces take their positions from the leftovers (they are always kept); the
                # leftovers it refuses after them go, as in a fresh round
                forced = forced_tokens(seq, k)
                st.block[1:1 + len(forced)] = forced
                st.forced = len(forced)
                self._cut(st, seq, grammar)
        return self.request(st, ctx)

    def outcome_from_logits(self, seq: Sequence, req: ForwardRequest, logits: torch.Tensor,
                            ctx: DecoderContext) -> Outcome:
        done = self.advance(seq.state, seq, req, logits, ctx)
        if done is None:
            return Outcome([])
        reused = seq.state.reused
        seq.state = self._next_round(seq.state, seq, done, ctx)
        if ctx.auto is not None and not reused:  # self_spec rounds teach auto the checkpoint's acceptance too
            ctx.auto.learn(seq.params, False, done.accepted, done.drafted, done.draft_forwards)  # (auto never reuses)
        return done.outcome

    @staticmethod
    def _next_round(st: SpecState, seq: Sequence, done: RoundResult, ctx: DecoderContext) -> SpecState:
        """What the next round starts from (its seed, this round's last token, is set by `next_forward`): the drafts
        this round's draft forward made past the first rejection when reusing them pays (see the module docstring),
        else a fresh round; either carries the sequence's tally."""
        assert st.tally is not None
        st.tally.add(st.reused, done.accepted)
        c, k = done.kept, len(st.block) - 1  # block indices: forced drafts count here
        # sampled one-shot drafts, or greedy drafts of any drafter (greedy verification is exact whatever it checks)
        reusable = c < k - 1 and (seq.params.temperature == 0 or st.q is not None and seq.logits_pipeline is None)
        if reusable and st.tally.reuse_pays():
            return SpecState([ctx.mask_id] + st.block[c + 2:], st.block_length, st.start + c + 1, drafted=True,
                             q=st.q[c + 1:] if st.q is not None else None, reused=True, tally=st.tally)
        return SpecState([], st.block_length, 0, tally=st.tally)  # a placeholder: `next_forward` begins the round

    # ---- the two forwards ----
    @staticmethod
    def _noise(st: SpecState, seq: Sequence, vocab: int) -> torch.Tensor:
        if st.noise is None:
            assert seq.params.seed is not None
            st.noise = keyed_gumbel(seq.params.seed, list(range(st.start, st.start + len(st.block))), vocab)
        return st.noise

    def _draft(self, st: SpecState, seq: Sequence, logits: torch.Tensor, ctx: DecoderContext) -> None:
        p = seq.params
        st.draft_forwards += 1
        masked = [i for i, t in enumerate(st.block) if t == ctx.mask_id and i > 0]
        rows = exclude(logits[masked], ctx.mask_id)
        conf: torch.Tensor | None = None
        forced = tuple(st.block[1:1 + st.forced])  # the masks follow them
        if seq.logits_pipeline is not None and p.threshold is None and p.temperature == 0:
            # one-shot greedy with sampling controls: d_i is the row's pick after d_1 .. d_{i-1}, as the verify
            # row of d_i sees them (so greedy drafts match more often)
            x0 = torch.tensor(greedy_chain(logits[masked], seq, ctx.mask_id, after=forced), dtype=torch.long)
        elif seq.logits_pipeline is not None and p.threshold is None:
            # one-shot sampled with sampling controls: d_i drawn from q_i after d_1 .. d_{i-1}, likewise (an
            # autoregressive q keeps speculative sampling exact)
            picks, qs = [], []
            for j in range(len(masked)):
                x, q = self._pick(st, seq, process(rows[j:j + 1], seq, [forced + tuple(picks)]), masked[j:j + 1])
                picks.append(int(x[0]))
                qs.append(q)
            x0 = torch.tensor(picks, dtype=torch.long)
            if qs and qs[0] is not None:  # forced drafts come from a deterministic drafter: one-hot q rows
                st.q = torch.cat([torch.nn.functional.one_hot(torch.tensor(forced, dtype=torch.long),
                                                              qs[0].shape[-1]).to(qs[0].dtype), *qs])
        else:
            if seq.logits_pipeline is not None:
                rows = process(rows, seq, committed_prefixes(st.block, masked, ctx.mask_id))
            x0, q = self._pick(st, seq, rows, masked)
            if q is not None:
                st.q = q  # one-shot: `masked` is every draft position, in order, so row i is q of d_{i+1}
        if p.threshold is None:  # reference default (threshold 0): one forward fills every mask
            n = len(masked)
        else:
            conf = rows.softmax(-1).gather(-1, x0[:, None]).squeeze(-1)
            n = commit_count(len(masked), len(masked), int((conf >= p.threshold).sum()), p.threshold)
        order = range(n) if conf is None else torch.argsort(conf, descending=True, stable=True)[:n].tolist()
        for j in order:
            st.block[masked[j]] = int(x0[j])
        st.drafted = n == len(masked)
        if st.drafted and (grammar := grammar_of(seq)) is not None:
            self._cut(st, seq, grammar)

    @staticmethod
    def _cut(st: SpecState, seq: Sequence, grammar: GrammarProcessor) -> None:
        """A constrained draft ends at the first token its grammar refuses, or after a stop id that ends the
        grammar: the verify would reject it there (its row masks it out) and no row after it is ever used. Drafts
        drawn one by one under the grammar (one-shot) are never refused: only tokens after a stop go, which the
        sequence never reaches, so speculative sampling with their q rows stays exact."""
        keep = grammar.first_refused(seq, st.block[1:])
        if keep < len(st.block) - 1:
            del st.block[1 + keep:]
            if st.q is not None:
                st.q = st.q[:keep]
            if st.noise is not None:  # keyed rounds: one noise row per block position
                st.noise = st.noise[:keep + 1]

    def _pick(self, st: SpecState, seq: Sequence, rows: torch.Tensor,
              masked: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft tokens for the rows of block positions `masked` (mask id excluded, controls applied), and their
        q rows when drawn by one-shot sampling (None for deterministic drafts)."""
        p = seq.params
        if p.temperature > 0 and st.keyed:
            return keyed_pick(rows, p, None, self._noise(st, seq, rows.shape[-1])[[i - 1 for i in masked]]), None
        if p.temperature > 0 and p.threshold is None:
            q = probabilities(rows, p, None)
            return torch.multinomial(q, 1, generator=seq.generator).squeeze(-1), q
        return greedy(rows), None  # greedy, or threshold drafting at T > 0: argmax drafts (a deterministic drafter)

    def _verify(self, st: SpecState, seq: Sequence, logits: torch.Tensor, ctx: DecoderContext) -> RoundResult:
        p = seq.params
        drafts = st.block[1:]
        k = len(drafts)
        raw = logits  # logprobs: the model's own rows
        if p.temperature == 0:  # the AR token of each position, up to the first that differs from its draft
            tokens = greedy_chain(logits, seq, ctx.mask_id, follow=drafts)
            c = len(tokens) - 1
        else:
            if seq.logits_pipeline is not None:  # row i follows d_1 .. d_i, as the ar step at that position would
                logits = process(logits, seq, [tuple(drafts[:i]) for i in range(k + 1)])
            if st.keyed:
                picks = keyed_pick(logits, p, ctx.mask_id, self._noise(st, seq, logits.shape[-1])).tolist()
                c = 0
                while c < k and picks[c] == drafts[c]:
                    c += 1
                tokens = picks[: c + 1]
            else:
                c, nxt = speculative_verify(probabilities(logits, p, ctx.mask_id), drafts, st.q, seq.generator)
                tokens = drafts[:c] + [nxt]
        # forced drafts are the grammar's, not speculation: the acceptance figures (and auto) leave them out
        f = min(st.forced, c)
        counters = {} if st.forced == k > 0 else \
            {SPEC_DRAFTS: 1, SPEC_DRAFT_TOKENS: k - st.forced, SPEC_ACCEPTED_TOKENS: c - f}
        if f:
            counters[GRAMMAR_FORCED_TOKENS] = f
        out = emit_tokens(tokens, raw[: c + 1], seq, ctx, num_kv_kept=c + 1, counters=counters)
        return RoundResult(out, c, c - f, k - st.forced, st.draft_forwards)
