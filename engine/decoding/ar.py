"""`ar`: one causal forward per token over the newest token, as `ar_generate`."""

from __future__ import annotations

import torch

from engine.decoding.base import Decoder, DecoderContext, Outcome, emit_tokens
from engine.forward import BatchKey, Forward, ForwardRequest
from engine.logits_processing import choose_next
from engine.sequence import Sequence

_KEY = BatchKey(Forward.AR_DECODE)


class AR(Decoder):
    def next_forward(self, seq: Sequence, ctx: DecoderContext) -> ForwardRequest:
        return ForwardRequest(_KEY, [seq.token_ids[-1]])

    def outcome_from_logits(self, seq: Sequence, req: ForwardRequest, logits: torch.Tensor,
                            ctx: DecoderContext) -> Outcome:
        chosen = choose_next(logits[-1:], seq, ctx.mask_id)
        return emit_tokens(chosen, logits[-1:], seq, ctx, num_kv_kept=1)
