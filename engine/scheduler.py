"""Scheduler: which sequences run in the next forward, and the KV pages they hold (it owns the BlockManager).

Rule (documented in README, knobs in `[engine]`): one forward per step carries every running sequence's next
forward, whatever its kind. Each sequence says which forward it needs (`prefill` chunk, `ar_decode`, `denoise`,
`commit`, `draft` or `verify`, with its own block length, step budget and draft-LoRA flag: a `BatchKey`), and all
of them ride in one ragged batch, one section per key (`engine/batch.py`): the weights are read once per step
however many modes, block lengths and step budgets are running. `max_num_batched_tokens` caps a forward's query
tokens: decode-like rows (every forward but prefill) go first, oldest first (the smallest `last_scheduled`), and
prefill chunks take the room left (a prompt is chunked to fit). A sequence left out waits one step longer than
the rows that ran, so it goes first next time: no sequence starves. A sequence is never held back for another:
each one asks for its own next forward every step (first done, first out).

Admission is FCFS, bounded by `max_num_seqs` and free KV blocks, and comes after the running sequences have their
slots (so a new sequence never takes the room of a running one, and none is admitted in a step that preempted).
An admitted sequence first takes the cached blocks of its longest cached prefix (`BlockManager.match`: whole
blocks, and never the prompt's last token, whose logits the prefill must produce), so its prefill starts after
them; a request asking for `prompt_logprobs` bypasses the lookup (every prompt row's logits are needed) but still
fills the cache. Its first prefill chunk then rides this step's forward with the room left in the token budget
(no room, no admission).
The full blocks a prefill chunk writes are registered in the cache as soon as the chunk is scheduled, so a request
admitted later in the same step (the other choices of an `n` > 1 request) already shares them: in the forward,
every layer writes all query tokens' K/V before any attention reads it. Before a forward every member gets slots
for its query tokens; when the pool runs dry the most recently admitted running sequence is preempted (its
references released, its K/V recomputed later from its tokens, from its cached blocks where they survived), as
vLLM's RECOMPUTE.
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
    the next forward's batch and reserves its pages, `commit_kv` / `remove` give pages back."""

    def __init__(self, blocks: BlockManager, ctx: DecoderContext, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.ctx = ctx
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up at first admission (cumulative)
        self.prefix_cache_hits = 0  # of those, tokens found cached
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

    def cache_committed(self, seq: Sequence) -> None:
        """Register `seq`'s full blocks whose tokens are in `token_ids` and whose K/V is committed (a diffusion
        block is emitted before its commit forward writes it; a self_spec verify may commit K/V past a stop)."""
        self.blocks.cache_blocks(seq, min(seq.num_computed_tokens, len(seq.token_ids)))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _cached_prefix(self, seq: Sequence) -> list[int] | None:
        """The cached blocks `seq` can start on (None: it does not look, as it needs every prompt row's logits)."""
        if seq.params.prompt_logprobs is not None and seq.num_output_tokens == 0:
            return None
        return self.blocks.match(seq, seq.prefill_target - 1)

    def _admit(self, budget: int) -> list[tuple[Sequence, ForwardRequest]]:
        """Admit waiting sequences FCFS while the token `budget` left, `max_num_seqs` and the free blocks allow (for
        the first chunk past the cached prefix); each starts on its cached blocks and its first chunk joins this
        forward (registered in the cache at once). Admission never preempts. A sequence is admitted only into a
        forward (as vLLM schedules waiting requests only with the budget left): the cached blocks it takes may be
        written by this very forward, and if that forward fails, every sequence reading them fails with it."""
        chosen: list[tuple[Sequence, ForwardRequest]] = []
        bs = self.blocks.block_size
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            looked = self._cached_prefix(seq)
            hit = looked or []
            start = len(hit) * bs
            first_end = start + min(seq.prefill_target - start, self.max_num_batched_tokens)
            need = self.blocks.num_evictable(hit) + max(0, -(-first_end // bs) - len(hit))
            if not self.blocks.can_allocate(need):
                break
            self.waiting.popleft()
            self.blocks.take(seq, hit)
            seq.num_computed_tokens = start
            if seq.num_cached_tokens is None:  # the first admission: the prompt's lookup is what the metrics count
                seq.num_cached_tokens = start
                if looked is not None and self.blocks.enable_caching:
                    self.prefix_cache_queries += seq.num_prompt_tokens
                    self.prefix_cache_hits += start
            seq.status = SequenceStatus.RUNNING
            seq.last_scheduled = self._step - 1  # as old as the rows that ran last step: they go first
            self.running.append(seq)
            req = self._next_forward(seq)
            if len(req.token_ids) > budget:
                req = replace(req, token_ids=req.token_ids[:budget])
            end = start + len(req.token_ids)
            self.blocks.allocate(seq, end)  # fits: `need` covered up to first_end >= end
            self.blocks.check_writable(seq, start, end)
            self.blocks.cache_blocks(seq, end, pending=True)
            chosen.append((seq, req))
            budget -= len(req.token_ids)
        return chosen

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
        """Every running sequence's next forward in one batch under the token budget, KV slots reserved, then new
        sequences admitted into the room left; None when nothing can run."""
        self._step += 1
        preempted_before = self.num_preemptions
        pairs = [(seq, self._next_forward(seq)) for seq in self.running]
        # oldest first; among equals decode-like rows before prefill chunks (stable: then in admission order)
        pairs.sort(key=lambda sr: (sr[0].last_scheduled, sr[1].forward is Forward.PREFILL))
        chosen: list[tuple[Sequence, ForwardRequest]] = []
        budget = self.max_num_batched_tokens
        for seq, req in pairs:
            if budget <= 0:
                break
            if req.forward is Forward.PREFILL and len(req.token_ids) > budget:
                req = replace(req, token_ids=req.token_ids[:budget])
            elif len(req.token_ids) > budget and chosen:
                continue  # a whole block does not fit the room left: it is the oldest next step
            chosen.append((seq, req))
            budget -= len(req.token_ids)
        chosen = self._reserve_slots(chosen)
        for seq, req in chosen:  # no preemption from here on: a prefill's blocks can be shared at once
            if req.forward is Forward.PREFILL:
                self.blocks.cache_blocks(seq, seq.num_computed_tokens + len(req.token_ids), pending=True)
        if self.num_preemptions == preempted_before:  # as vLLM: a step that preempted admits nobody
            chosen += self._admit(self.max_num_batched_tokens - sum(len(r.token_ids) for _, r in chosen))
        if not chosen:
            return None
        for seq, _ in chosen:
            seq.last_scheduled = self._step
        return Batch([s for s, _ in chosen], [r for _, r in chosen])

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
                self.blocks.check_writable(seq, seq.num_computed_tokens, end)
                kept.append((seq, req))
        return [(s, r) for s, r in kept if s.status == SequenceStatus.RUNNING]
