"""BlockManager: the paged KV pool's bookkeeping (which block belongs to which sequence). CPU-side only.

The engine builds it from the runner's sizing and hands it to the scheduler, its only owner; the runner holds the
pool's memory and reads each forward's block tables from the Batch.

A sequence's `block_table` lists its pages in order; token position p lives at slot
`block_table[p // block_size] * block_size + p % block_size`. Blocks are handed out for every query token a
forward will write (committed or scratch), cropped back to the committed length after a self_spec verify, and all
returned on finish, abort or preemption, so `num_free_blocks == num_blocks` whenever no work is in flight.
"""

from __future__ import annotations

from engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV cache needs >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._owner: dict[int, str] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that positions [0, num_tokens) have slots."""
        need = -(-num_tokens // self.block_size)
        return max(0, need - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` to cover `num_tokens` positions. Caller checked `can_allocate`."""
        n = self.blocks_needed(seq, num_tokens)
        assert n <= len(self._free), "allocate() without can_allocate()"
        for _ in range(n):
            block = self._free.pop()
            assert block not in self._owner, f"block {block} handed out twice"
            self._owner[block] = seq.request_id
            seq.block_table.append(block)

    def crop(self, seq: Sequence, num_tokens: int) -> None:
        """Free the blocks past the first `num_tokens` positions (self_spec rollback of rejected drafts)."""
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def free(self, seq: Sequence) -> None:
        while seq.block_table:
            self._release(seq.block_table.pop())

    def _release(self, block: int) -> None:
        assert self._owner.pop(block, None) is not None, f"block {block} freed twice"
        self._free.append(block)

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Flat slot ids of positions [start, end)."""
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]
