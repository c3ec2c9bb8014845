"""Scheduler: which sequences run in the next forward, and the KV pages they hold (it owns the BlockManager).

Grouping rule (documented in README, knobs in `[engine]`): every step each running sequence says which forward it
needs next: `prefill` (chunked), `ar_decode`, `denoise`, `commit`, `draft` or `verify`, as a `BatchKey` (the
forward, the draft-LoRA flag, and `steps` / `block_length` where they shape it). Sequences with equal keys form a
group and the step runs exactly one group: the one whose members waited longest (the smallest `last_scheduled`),
so groups take turns and no mode starves. Prefill chunks ride along with a causal decode group (`ar_decode`,
`commit`, `verify`: the same kind of forward, writing K/V) when either is chosen, so a newly arrived request does
not cost the running ones a forward of their own; the batch is named after the decode group. Within a group the
longest-waiting sequences go first while the query tokens fit `max_num_batched_tokens` (a prefill is chunked to
the room left). A sequence is never held back for the slowest of its group: each one asks for its own next
forward every step.

Admission is FCFS, bounded by `max_num_seqs` and free KV blocks. Before a forward every member gets slots for its
query tokens; when the pool runs dry the most recently admitted running sequence is preempted (its blocks freed,
its K/V recomputed later from its tokens), as vLLM's RECOMPUTE.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from engine.batch import Batch
from engine.decoding.base import DecoderContext
from engine.decoding.registry import DECODERS
from engine.forward import BatchKey, Forward, ForwardRequest
from engine.kv_cache import BlockManager
from engine.sequence import Sequence, SequenceStatus

_PREFILL = BatchKey(Forward.PREFILL)


class Scheduler:
    """The waiting and running queues and the KV pages (`blocks`, handed over by the Engine): `schedule()` picks
    the next batch and reserves its pages, `commit_kv` / `remove` give pages back."""

    def __init__(self, blocks: BlockManager, ctx: DecoderContext, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.ctx = ctx
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._step = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

    def commit_kv(self, seq: Sequence, num_kv_kept: int) -> None:
        """After a causal forward: `num_kv_kept` of the entries it wrote become committed; the pages past them
        (rejected self_spec drafts) go back to the pool."""
        seq.num_computed_tokens += num_kv_kept
        self.blocks.crop(seq, seq.num_computed_tokens)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            first_chunk = min(seq.prefill_target, self.max_num_batched_tokens)
            if not self.blocks.can_allocate(self.blocks.blocks_needed(seq, first_chunk)):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)

    def _next_forward(self, seq: Sequence) -> ForwardRequest:
        if seq.is_prefilling:
            tokens = seq.token_ids[seq.num_computed_tokens: seq.prefill_target]
            # prompt logprobs need every row's logits, until the first output token has carried them out
            rows = seq.params.prompt_logprobs is not None and seq.num_output_tokens == 0
            return ForwardRequest(_PREFILL, tokens, all_logits=rows)
        assert seq.params.mode is not None
        return DECODERS[seq.params.mode].next_forward(seq, self.ctx)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        assert seq.params.mode is not None
        owed_sample = DECODERS[seq.params.mode].reset_for_recompute(seq)
        seq.sample_after_prefill = seq.sample_after_prefill or owed_sample
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> Batch | None:
        """Pick the next homogeneous batch and give its members KV slots; None when nothing can run."""
        self._step += 1
        self._admit()
        if not self.running:
            return None
        groups: dict[BatchKey, list[tuple[Sequence, ForwardRequest]]] = {}
        for seq in self.running:
            req = self._next_forward(seq)
            groups.setdefault(req.key, []).append((seq, req))
        key = min(groups, key=lambda k: (min(s.last_scheduled for s, _ in groups[k]), k.forward != Forward.PREFILL))
        members = sorted(groups[key], key=lambda sr: sr[0].last_scheduled)
        forward = key.forward
        if forward.causal and not key.draft_lora:
            # Mixed batch (vLLM-style): prefill chunks and one causal decode group (ar_decode, commit or verify)
            # write K/V the same way, so they share a forward and pay for one pass over the weights instead of two.
            # Decode members go first (a token or a block each), prefill chunks take the room left.
            if forward == Forward.PREFILL:
                partners = [k for k in groups if k.forward.causal and not k.draft_lora and k.forward != Forward.PREFILL]
                if partners:
                    decode = min(partners, key=lambda k: min(s.last_scheduled for s, _ in groups[k]))
                    forward = decode.forward
                    members = sorted(groups[decode], key=lambda sr: sr[0].last_scheduled) + members
            elif _PREFILL in groups:
                members += sorted(groups[_PREFILL], key=lambda sr: sr[0].last_scheduled)
        chosen: list[tuple[Sequence, ForwardRequest]] = []
        budget = self.max_num_batched_tokens
        for seq, req in members:
            if budget <= 0:
                break
            if req.forward == Forward.PREFILL and len(req.token_ids) > budget:
                req = replace(req, token_ids=req.token_ids[:budget])
            elif len(req.token_ids) > budget and chosen:
                continue
            chosen.append((seq, req))
            budget -= len(req.token_ids)
        chosen = self._reserve_slots(chosen)
        if not chosen:
            return None
        for seq, _ in chosen:
            seq.last_scheduled = self._step
        return Batch(forward, key.draft_lora, [s for s, _ in chosen], [r for _, r in chosen])

    def _reserve_slots(self, chosen: list[tuple[Sequence, ForwardRequest]]) -> list[tuple[Sequence, ForwardRequest]]:
        kept: list[tuple[Sequence, ForwardRequest]] = []
        for seq, req in chosen:
            if seq.status != SequenceStatus.RUNNING:  # preempted for an earlier member of this batch
                continue
            end = seq.num_computed_tokens + len(req.token_ids)
            while not self.blocks.can_allocate(self.blocks.blocks_needed(seq, end)):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                self.blocks.allocate(seq, end)
                kept.append((seq, req))
        return [(s, r) for s, r in kept if s.status == SequenceStatus.RUNNING]
