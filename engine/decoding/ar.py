"""`ar`: one causal forward per token over the newest token, as `ar_generate`."""

from __future__ import annotations

import torch

from engine.decoding import DecodeEnv, ForwardKind, ForwardRequest, Outcome, chosen
from engine.sampling import sample
from engine.sequence import Sequence


class AR:
    def next_forward(self, seq: Sequence, env: DecodeEnv) -> ForwardRequest:
        return ForwardRequest("ar_decode", ForwardKind.CAUSAL, [seq.token_ids[-1]])

    def consume(self, seq: Sequence, req: ForwardRequest, logits: torch.Tensor, env: DecodeEnv) -> Outcome:
        return chosen(sample(logits[-1:], seq.params, seq.generator, env.mask_id), logits[-1:], seq, env,
                      num_kv_kept=1)
