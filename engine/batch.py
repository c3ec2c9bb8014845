"""Batch: one scheduled forward, carrying every chosen sequence's next forward whatever its kind, as sections.

The scheduler builds it, the runner turns it into one ragged tensor batch (the linear layers run once over all
rows, attention runs per sequence with its own mask), and the engine hands each sequence its logit rows.

Row order is canonical: sequences are sorted into sections (one per `BatchKey`), bidirectional sections first
(the draft-LoRA ones leading), then the causal ones (`ar_decode`, `verify`, `commit`, `prefill`). So the rows
that get the draft adapter are one leading range, and bidirectional and causal rows are two ranges: the runner
and the attention plans take slices instead of gathers. Within a section, the scheduler's order (oldest first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.forward import BatchKey, Forward, ForwardRequest
from engine.sequence import Sequence

_FORWARD_ORDER = {f: i for i, f in enumerate(
    (Forward.DRAFT, Forward.DENOISE, Forward.AR_DECODE, Forward.VERIFY, Forward.COMMIT, Forward.PREFILL))}


def section_order(key: BatchKey) -> tuple[int, int, int, int, int]:
    """Sort key of a section: draft-LoRA rows, then other bidirectional rows, then causal rows."""
    return (not key.draft_lora, key.forward.causal, _FORWARD_ORDER[key.forward], key.block_length or 0,
            key.steps or 0)


@dataclass(frozen=True, slots=True)
class Section:
    """Sequences `start:end` of a batch, all asking for a forward with `key`."""

    key: BatchKey
    start: int
    end: int


@dataclass
class Batch:
    """`requests[i]` is `seqs[i]`'s part. Built from the pairs in any order, it sorts them into the canonical order
    (stable: each section keeps the order given) and lists the sections."""

    seqs: list[Sequence]
    requests: list[ForwardRequest]
    sections: list[Section] = field(init=False)

    def __post_init__(self) -> None:
        assert self.seqs and len(self.seqs) == len(self.requests), "a batch holds one request per sequence"
        first = self.requests[0].key
        if all(r.key is first or r.key == first for r in self.requests):  # one section: nothing to sort
            self.sections = [Section(first, 0, len(self.requests))]
            return
        rank = {r.key: section_order(r.key) for r in self.requests}
        order = sorted(range(len(self.seqs)), key=lambda i: rank[self.requests[i].key])
        self.seqs = [self.seqs[i] for i in order]
        self.requests = [self.requests[i] for i in order]
        starts = [i for i in range(len(order)) if i == 0 or self.requests[i].key != self.requests[i - 1].key]
        ends = starts[1:] + [len(order)]
        self.sections = [Section(self.requests[a].key, a, b) for a, b in zip(starts, ends)]

    @property
    def forward(self) -> Forward:
        """The leading section's forward: the batch's name in logs (a homogeneous batch's only forward)."""
        return self.requests[0].forward

    @property
    def num_query_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.requests)

    @property
    def block_tables(self) -> list[list[int]]:
        """Each sequence's KV pages, as the scheduler's block manager reserved them for this forward."""
        return [s.block_table for s in self.seqs]
