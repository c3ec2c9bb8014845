"""Batch: the sequences of one scheduled forward and what each asks of it; the scheduler builds it, the runner
turns it into tensors, the engine applies the decoders' outcomes to its sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.forward import Forward, ForwardRequest
from engine.sequence import Sequence


@dataclass
class Batch:
    """`requests[i]` is `seqs[i]`'s part. `forward` names the batch (in metrics too): the decode group's forward
    when prefill chunks ride along with it, whose requests keep `Forward.PREFILL`."""

    forward: Forward
    draft_lora: bool
    seqs: list[Sequence]
    requests: list[ForwardRequest]

    @property
    def causal(self) -> bool:
        return self.forward.causal

    @property
    def num_query_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.requests)

    @property
    def block_tables(self) -> list[list[int]]:
        """Each sequence's KV pages, as the scheduler's block manager reserved them for this forward."""
        return [s.block_table for s in self.seqs]
