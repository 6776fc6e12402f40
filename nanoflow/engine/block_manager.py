"""Paged KV cache bookkeeping: fixed-size blocks, a free list, one block table per sequence."""
from __future__ import annotations

from collections import deque

from nanoflow.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks still to allocate for seq to hold num_tokens tokens."""
        return max(self.blocks_for(num_tokens) - len(seq.block_table), 0)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.needed(seq, num_tokens) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        n = self.needed(seq, num_tokens)
        if n > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {n}, {self.num_free} free")
        seq.block_table.extend(self.free_blocks.popleft() for _ in range(n))

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
