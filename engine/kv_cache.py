"""BlockManager: the paged KV pool's bookkeeping (which block belongs to whom) and the automatic prefix cache.
CPU-side only.

The engine builds it from the runner's sizing and hands it to the scheduler, its only owner; the runner holds the
pool's memory and reads each forward's block tables from the Batch.

A sequence's `block_table` lists its pages in order; token position p lives at slot
`block_table[p // block_size] * block_size + p % block_size`. Blocks are handed out for every query token a
forward will write (committed or scratch), cropped back to the committed length after a self_spec verify, and all
released on finish, abort or preemption.

Prefix caching (on unless `enable_caching=False`), as vLLM's automatic prefix caching: a *full* block of
committed tokens gets a hash chained over its parent's hash, its token ids, the request's `cache_salt` and the
identity of the weights that wrote its K/V (`KV_ADAPTER`), and is registered under that hash. Blocks are
reference counted: a new sequence whose leading full blocks hash the same takes references on them instead of
computing them. A block whose count drops to 0 goes back to the free pool, but a registered one keeps its hash
and content there (the *evictable* pool, least recently released first) and is evicted, losing its hash, only
when no never-registered block is left. So `num_free_blocks == num_blocks` still holds whenever no work is in
flight.

Why a registered block is never written again: its tokens are committed, so every position in it lies below its
holders' `num_computed_tokens`, and every forward writes only at positions >= `num_computed_tokens` (scratch K/V
of drafts and denoise steps included); crops never go below the committed length. `check_writable` asserts this
for every forward, and `check_invariants` checks the whole pool against the live sequences (the tests run it).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable

from engine.sequence import Sequence

# The weights whose forwards write committed K/V: the base model's. The draft LoRA only rides bidirectional
# forwards (self_spec drafts, diffusion denoise steps), which never commit K/V (engine/forward.py; the engine
# asserts it in `_apply_outcome`), so every cached block was written without an adapter. A per-request adapter on
# causal forwards would put its name here per sequence: blocks written under another adapter must never match.
KV_ADAPTER = ""


def block_hash(parent: bytes | None, token_ids: Iterable[int], cache_salt: str | None, adapter: str) -> bytes:
    """The hash of one full block: sha256 over its parent's hash, the salt, the adapter and its token ids."""
    h = hashlib.sha256(parent if parent is not None else b"root")
    for text in (cache_salt, adapter):
        raw = b"\xff" if text is None else text.encode("utf-8", "surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV cache needs >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._plain: list[int] = list(range(num_blocks - 1, -1, -1))  # free, nothing cached; pop() = low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached: least recently released first
        self._table: dict[bytes, int] = {}  # hash -> the block holding it
        self._pending: list[int] = []  # registered for a forward that has not run yet (`drop_pending`)
        self.num_evictions = 0

    # ---- the pool ---------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds: never-registered ones and cached ones that can be evicted."""
        return len(self._plain) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._table)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that positions [0, num_tokens) have slots."""
        need = -(-num_tokens // self.block_size)
        return max(0, need - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` to cover `num_tokens` positions with fresh private blocks (a cached free block is
        evicted only when no other is left). Caller checked `can_allocate`."""
        n = self.blocks_needed(seq, num_tokens)
        assert n <= self.num_free_blocks, "allocate() without can_allocate()"
        for _ in range(n):
            if self._plain:
                block = self._plain.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._uncache(block)
                self.num_evictions += 1
            assert self._ref[block] == 0, f"block {block} handed out twice"
            self._ref[block] = 1
            seq.block_table.append(block)

    def crop(self, seq: Sequence, num_tokens: int) -> None:
        """Release the blocks past the first `num_tokens` positions (self_spec rollback of rejected drafts). They
        hold uncommitted positions, so they are private and never registered."""
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            block = seq.block_table[-1]
            assert self._ref[block] == 1 and self._hash[block] is None, f"crop of shared or cached block {block}"
            self._release(seq.block_table.pop())
        seq.num_hashed_blocks = min(seq.num_hashed_blocks, len(seq.block_table))

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq` (finish, abort, preemption); shared ones stay with their other holders.
        The tail goes first, so a prompt's leading blocks are the last of them to be evicted."""
        while seq.block_table:
            self._release(seq.block_table.pop())
        seq.num_hashed_blocks = 0

    def _release(self, block: int) -> None:
        assert self._ref[block] > 0, f"block {block} freed twice"
        self._ref[block] -= 1
        if self._ref[block] == 0:
            if self._hash[block] is not None:
                self._evictable[block] = None
            else:
                self._plain.append(block)

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Flat slot ids of positions [start, end)."""
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    # ---- the prefix cache -------------------------------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The hashes of `seq`'s first `num_blocks` full blocks (memoized on the sequence: tokens only grow)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else None, seq.token_ids[i * bs:(i + 1) * bs],
                                     seq.params.cache_salt, KV_ADAPTER))
        return hashes[:num_blocks]

    def match(self, seq: Sequence, limit: int) -> list[int]:
        """The cached blocks holding `seq`'s longest cached prefix within its first `limit` tokens."""
        if not self.enable_caching or limit < self.block_size:
            return []
        hit: list[int] = []
        for h in self._hashes(seq, limit // self.block_size):
            block = self._table.get(h)
            if block is None:
                break
            hit.append(block)
        return hit

    def num_evictable(self, blocks: list[int]) -> int:
        """How many of `blocks` sit in the free pool (taking them uses up free blocks)."""
        return sum(self._ref[b] == 0 for b in blocks)

    def take(self, seq: Sequence, blocks: list[int]) -> None:
        """Start `seq` (holding no block) on the cached `blocks` from `match`: one more reference each."""
        assert not seq.block_table, "take() on a sequence that holds blocks"
        for block in blocks:
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
            seq.block_table.append(block)
        seq.num_hashed_blocks = len(blocks)

    def cache_blocks(self, seq: Sequence, num_tokens: int, pending: bool = False) -> None:
        """Register `seq`'s full blocks within its first `num_tokens` positions, whose K/V is committed (or, with
        `pending`, is written by the forward being scheduled: see `drop_pending`). A block whose hash is already
        registered elsewhere stays private."""
        if not self.enable_caching:
            return
        full = min(num_tokens // self.block_size, len(seq.block_table))
        if full <= seq.num_hashed_blocks:
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_hashed_blocks, full):
            block, h = seq.block_table[i], hashes[i]
            if self._hash[block] is None and h not in self._table:
                self._table[h] = block
                self._hash[block] = h
                if pending:
                    self._pending.append(block)
        seq.num_hashed_blocks = full

    def forward_ran(self) -> None:
        """The scheduled forward ran: the blocks registered for it hold their K/V now."""
        self._pending.clear()

    def drop_pending(self) -> None:
        """The scheduled forward failed: the blocks registered for it hold no K/V, so they lose their hash."""
        for block in self._pending:
            if self._hash[block] is not None:
                self._uncache(block)
                if self._ref[block] == 0:
                    del self._evictable[block]
                    self._plain.append(block)
        self._pending.clear()

    def reset(self) -> int:
        """Forget every cached block (POST /reset_prefix_cache); blocks in use stay with their holders as private
        blocks. Returns how many blocks lost their hash."""
        dropped = len(self._table)
        for block in list(self._table.values()):
            self._uncache(block)
        self._plain.extend(reversed(self._evictable))
        self._evictable.clear()
        self._pending.clear()
        return dropped

    def _uncache(self, block: int) -> None:
        h = self._hash[block]
        assert h is not None and self._table.get(h) == block
        del self._table[h]
        self._hash[block] = None

    # ---- checks -----------------------------------------------------------------------------------------------
    def check_writable(self, seq: Sequence, start: int, end: int) -> None:
        """A forward writes positions [start, end) of `seq`: they must lie in private, unregistered blocks."""
        bs = self.block_size
        for i in range(start // bs, -(-end // bs)):
            block = seq.block_table[i]
            if self._ref[block] != 1 or self._hash[block] is not None:
                raise AssertionError(f"{seq.request_id}: a forward would write positions {start}..{end - 1} into "
                                     f"block {block} (refs {self._ref[block]}, cached {self._hash[block] is not None})")

    def check_invariants(self, seqs: Iterable[Sequence]) -> None:
        """Every count exact against the sequences holding blocks: references, the free pools, the hash table.
        AssertionError names the first thing wrong."""
        refs = [0] * self.num_blocks
        for seq in seqs:
            for block in seq.block_table:
                refs[block] += 1
        assert refs == self._ref, "reference counts differ from the block tables"
        free = [b for b in range(self.num_blocks) if refs[b] == 0]
        assert len(self._plain) + len(self._evictable) == len(free), "free count wrong"
        assert sorted([*self._plain, *self._evictable]) == free, "a block is free twice, or held and free"
        assert all(self._hash[b] is None for b in self._plain), "a cached block sits in the plain free pool"
        assert all(self._hash[b] is not None for b in self._evictable), "an uncached block is evictable"
        assert {self._table[h]: h for h in self._table} == {
            b: h for b, h in enumerate(self._hash) if h is not None}, "hash table and block hashes disagree"
