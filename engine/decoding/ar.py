"""`ar`: one causal forward per token over the newest token, as `ar_generate`; under a grammar, jump-forward.

Jump-forward: where a request's grammar forces the next tokens whatever the model says (the `": "` between a JSON
key and its value; `engine.grammar.forced_tokens`), the step's forward takes them after the newest token and the
step emits them with the token chosen after them: m + 1 tokens for one forward instead of m + 1 forwards. The
output is the one token-by-token steps give: every row of a forced position has exactly that token left by its
mask, so greedy and sampled choices both return it (only the random draws they would have spent are saved, so a
seeded request is reproducible but draws differently from one that never jumped). `auto`'s ar steps do the same.
"""

from __future__ import annotations

import torch

from engine.decoding.base import Decoder, DecoderContext, Outcome, emit_tokens
from engine.decoding.modes import GRAMMAR_FORCED_TOKENS
from engine.forward import BatchKey, Forward, ForwardRequest
from engine.grammar import forced_tokens
from engine.logits_processing import choose_next
from engine.sequence import Sequence

_KEY = BatchKey(Forward.AR_DECODE)


def ar_request(seq: Sequence) -> ForwardRequest:
    """An ar step over the newest token, and the tokens the grammar forces after it (room left for one more)."""
    forced = forced_tokens(seq, seq.params.max_tokens - seq.num_output_tokens - 1)
    # logprobs of forced tokens need their rows; otherwise only the last row is used
    logprobs = bool(forced) and seq.params.logprobs is not None
    return ForwardRequest(_KEY, [seq.token_ids[-1], *forced], all_logits=logprobs)


def ar_emit(chosen: list[int], seq: Sequence, req: ForwardRequest, logits: torch.Tensor, ctx: DecoderContext,
            counters: dict[str, int] | None = None) -> Outcome:
    """The Outcome of an ar step: the forced tokens it carried, then `chosen` (picked from the last row)."""
    forced = req.token_ids[1:]
    counters = dict(counters or {})
    if forced:
        counters[GRAMMAR_FORCED_TOKENS] = len(forced)
    rows = logits if req.all_logits else logits[-1:]
    return emit_tokens(forced + chosen, rows, seq, ctx, num_kv_kept=len(req.token_ids), counters=counters)


class AR(Decoder):
    def next_forward(self, seq: Sequence, ctx: DecoderContext) -> ForwardRequest:
        return ar_request(seq)

    def outcome_from_logits(self, seq: Sequence, req: ForwardRequest, logits: torch.Tensor,
                            ctx: DecoderContext) -> Outcome:
        return ar_emit(choose_next(logits[-1:], seq, ctx.mask_id, after=req.token_ids[1:]), seq, req, logits, ctx)
