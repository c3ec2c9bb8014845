"""`diffusion`: block diffusion with an AR seed, as the reference `generate` (causal_context=True).

Per block of length L: `[seed, MASK x (L-1)]`, where the seed is the token sampled by the prefill or by the
previous block's commit. Bidirectional read-only denoise forwards each commit the most confident masked
position, every other one whose confidence reaches `threshold` (1.0 = none), and at least
`ceil(masks_left / steps_left)` so the block always resolves within `steps` forwards (`steps = L` is the
reference schedule without a threshold: one token per step; `steps = 1` fills the block at once).
Committed tokens are final (no remasking). Denoising stops early once a stop token is in the block with no
mask before it. The resolved block is emitted at once; then one causal commit forward writes its K/V and its
last logit gives the next seed. A block that ends the request (stop token, `max_tokens`) skips the commit
forward, which could only produce tokens that are cut anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.decoding.base import Decoder, DecoderContext, Outcome, emit_tokens
from engine.decoding.modes import DENOISE_STEPS_PER_BLOCK
from engine.forward import BatchKey, Forward, ForwardRequest
from engine.logits_processing import choose_next, committed_prefixes, process
from engine.sampling import denoise_pick, token_logprobs
from engine.sequence import Logprob, Sequence


@dataclass
class DiffusionState:
    block: list[int]  # [seed, ...]; undecided positions hold the mask id
    steps_done: int = 0
    resolved: bool = False  # denoising finished; the commit forward is next
    logprobs: dict[int, Logprob] = field(default_factory=dict)  # block position -> from the step that committed it


def commit_count(num_masked: int, steps_left: int, confident: int, threshold: float | None) -> int:
    """How many masked positions one denoise step commits."""
    need = -(-num_masked // max(steps_left, 1))  # finish within the step budget
    # threshold 1.0 means "schedule only": a softmax reaches exactly 1.0 only by fp32 saturation
    if threshold is None or threshold >= 1.0:
        return min(num_masked, need)
    return min(num_masked, max(1, need, confident))


class BlockDiffusion(Decoder):
    def next_forward(self, seq: Sequence, ctx: DecoderContext) -> ForwardRequest:
        p = seq.params
        assert p.block_length is not None and p.steps is not None
        if seq.state is None:
            seq.state = DiffusionState([seq.token_ids[-1]] + [ctx.mask_id] * (p.block_length - 1))
        st: DiffusionState = seq.state
        if st.resolved:
            return ForwardRequest(BatchKey(Forward.COMMIT, block_length=p.block_length), list(st.block))
        key = BatchKey(Forward.DENOISE, draft_lora=ctx.diffusion_lora, block_length=p.block_length, steps=p.steps)
        return ForwardRequest(key, list(st.block), all_logits=True)

    def outcome_from_logits(self, seq: Sequence, req: ForwardRequest, logits: torch.Tensor,
                            ctx: DecoderContext) -> Outcome:
        st: DiffusionState = seq.state
        if req.forward == Forward.COMMIT:
            seq.state = None
            seed = choose_next(logits[-1:], seq, ctx.mask_id)
            return emit_tokens(seed, logits[-1:], seq, ctx, num_kv_kept=len(req.token_ids))
        p = seq.params
        block = st.block
        masked = [i for i, t in enumerate(block) if t == ctx.mask_id and i > 0]
        if seq.logits_pipeline is not None and seq.logits_pipeline.ordered:
            x0, order = self._pick_left_to_right(st, seq, logits, masked, ctx)
        else:
            rows = logits[masked]  # rows of masked positions, each after the committed run to its left
            if seq.logits_pipeline is not None:
                rows = process(rows, seq, committed_prefixes(block, masked, ctx.mask_id))
            x0, conf = denoise_pick(rows, p, seq.generator, ctx.mask_id)
            confident = int((conf >= p.threshold).sum()) if p.threshold is not None else 0
            n = commit_count(len(masked), p.steps - st.steps_done, confident, p.threshold)
            order = torch.argsort(conf, descending=True, stable=True)[:n].tolist()
        for j in order:
            block[masked[j]] = int(x0[j])
        if p.logprobs is not None:
            lps = token_logprobs(logits[[masked[j] for j in order]], [int(x0[j]) for j in order], p.logprobs,
                                 ctx.mask_id)
            st.logprobs.update(zip((masked[j] for j in order), lps))
        st.steps_done += 1
        remaining = [i for i, t in enumerate(block) if t == ctx.mask_id and i > 0]
        first_stop = next((i for i, t in enumerate(block) if i > 0 and t in seq.stop_ids), None)
        if first_stop is not None and all(i > first_stop for i in remaining):
            st.resolved = True
            return self._emit(st, first_stop + 1, p.logprobs is not None)
        if not remaining:
            st.resolved = True
            return self._emit(st, len(block), p.logprobs is not None)
        return Outcome([])

    @staticmethod
    def _pick_left_to_right(st: DiffusionState, seq: Sequence, logits: torch.Tensor, masked: list[int],
                            ctx: DecoderContext) -> tuple[torch.Tensor, list[int]]:
        """Commits for a pipeline whose processors need each row's exact left context (multi-token bad words, a
        grammar): the leftmost masked positions, in order, each picked after the tokens to its left (committed
        before, or just now). As many as the schedule needs, and more while each next one is confident; still one
        denoise forward per step. (x0 per masked index, the indices committed)."""
        p = seq.params
        need = -(-len(masked) // max(p.steps - st.steps_done, 1))
        x0 = torch.zeros(len(masked), dtype=torch.long)
        order: list[int] = []
        for j, pos in enumerate(masked):  # every position left of masked[0] is committed (commits go in order)
            prefix = tuple(st.block[1:pos])
            tok, conf = denoise_pick(process(logits[pos:pos + 1], seq, [prefix]), p, seq.generator, ctx.mask_id)
            if order and len(order) >= need and not (p.threshold is not None and p.threshold < 1.0
                                                     and float(conf[0]) >= p.threshold):
                break
            x0[j] = tok[0]
            st.block[pos] = int(tok[0])
            order.append(j)
        return x0, order

    def reset_for_recompute(self, seq: Sequence) -> bool:
        # a resolved block was emitted before its commit forward ran: the recompute covers all of it, and its last
        # logit gives the next seed, exactly what the commit would have done
        resolved = isinstance(seq.state, DiffusionState) and seq.state.resolved
        seq.state = None
        return resolved

    @staticmethod
    def _emit(st: DiffusionState, end: int, with_logprobs: bool) -> Outcome:
        """The resolved block's positions 1 .. end - 1, with the logprobs recorded when each was committed."""
        lps = [st.logprobs[i] for i in range(1, end)] if with_logprobs else None
        return Outcome(st.block[1:end], logprobs=lps, observations={DENOISE_STEPS_PER_BLOCK: st.steps_done})
