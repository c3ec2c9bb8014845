"""`self_spec`: linear self-speculation, as the reference `linear_spec_generate`, batched.

Each iteration is two forwards over `[seed, d1 ... dk]` (k = L - 1, fewer near `max_tokens`): a bidirectional
read-only draft (draft LoRA on when the checkpoint ships one) that fills the masks, then a causal verify that
writes K/V. `ar[i]` is the AR token for position i + 1; the longest prefix with `ar[i] == d(i+1)` is accepted plus
one bonus token, so `ar[0 .. c]` is emitted and the seed + c drafts stay committed; the rejected K/V is cropped
and the bonus becomes the next seed. Acceptance is exact match at every temperature, so greedy output equals
greedy `ar` token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.decoding.base import Decoder, DecoderContext, Outcome, emit_tokens
from engine.decoding.diffusion import commit_count
from engine.decoding.modes import SPEC_ACCEPTED_TOKENS, SPEC_DRAFT_TOKENS, SPEC_DRAFTS
from engine.forward import BatchKey, Forward, ForwardRequest
from engine.sampling import denoise_pick, sample
from engine.sequence import Sequence


@dataclass
class SpecState:
    block: list[int]  # [seed, d1 ... dk]; masks while drafting
    drafted: bool = False


class SelfSpec(Decoder):
    def next_forward(self, seq: Sequence, ctx: DecoderContext) -> ForwardRequest:
        p = seq.params
        assert p.block_length is not None
        if seq.state is None:
            # never draft past max_tokens: k drafts + the bonus give at most k + 1 tokens
            k = min(p.block_length - 1, p.max_tokens - seq.num_output_tokens - 1)
            seq.state = SpecState([seq.token_ids[-1]] + [ctx.mask_id] * k, drafted=k == 0)
        st: SpecState = seq.state
        if not st.drafted:
            key = BatchKey(Forward.DRAFT, draft_lora=ctx.spec_lora, block_length=p.block_length)
            return ForwardRequest(key, list(st.block), all_logits=True)
        return ForwardRequest(BatchKey(Forward.VERIFY, block_length=p.block_length), list(st.block), all_logits=True)

    def consume(self, seq: Sequence, req: ForwardRequest, logits: torch.Tensor, ctx: DecoderContext) -> Outcome:
        st: SpecState = seq.state
        p = seq.params
        if req.forward == Forward.DRAFT:
            masked = [i for i, t in enumerate(st.block) if t == ctx.mask_id and i > 0]
            x0, conf = denoise_pick(logits[masked], p, seq.generator, ctx.mask_id)
            if p.threshold is None:  # reference default (threshold 0): one forward fills every mask
                n = len(masked)
            else:
                n = commit_count(len(masked), len(masked), int((conf >= p.threshold).sum()), p.threshold)
            for j in torch.argsort(conf, descending=True, stable=True)[:n].tolist():
                st.block[masked[j]] = int(x0[j])
            st.drafted = n == len(masked)
            return Outcome([])
        ar = sample(logits, p, seq.generator, ctx.mask_id)  # ar[i]: the AR token for block position i + 1
        k = len(st.block) - 1
        c = 0
        while c < k and ar[c] == st.block[c + 1]:
            c += 1
        seq.state = None
        return emit_tokens(ar[: c + 1], logits[: c + 1], seq, ctx, num_kv_kept=c + 1,
                           counters={SPEC_DRAFTS: 1, SPEC_DRAFT_TOKENS: k, SPEC_ACCEPTED_TOKENS: c})
