"""The paged KV cache: a pool of fixed-size blocks and the allocator that hands them out.

A sequence owns a block table (list of block ids); token position p of that sequence lives
at slot block_table[p // block_size] * block_size + p % block_size. BlockAllocator is plain
Python (no torch) so the scheduler stays deterministic and cheap to test.
"""
from __future__ import annotations

import torch

from ktengine.state_cache import SlotAllocator, StateCache


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int, have: int) -> int:
        """Blocks to add to a table of `have` blocks so it holds `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache: {n} blocks asked, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def slots_of(block_table: list[int], block_size: int, start: int, end: int) -> list[int]:
    """Cache slots of positions [start, end) of a sequence."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


class KVCache:
    """Per attention layer K and V tensors [(num_blocks + 1) * block_size, kv_heads, head_dim],
    and for models with linear-attention layers the per-request state pool beside them.

    The last block (`scratch_block`) is never handed out: fixed-shape decode steps (CUDA
    graphs) write their padding rows' K/V there and point unused block-table entries at it.
    """

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device, state: StateCache | None = None,
    ) -> None:
        shape = ((num_blocks + 1) * block_size, num_kv_heads, head_dim)
        self.scratch_block = num_blocks
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.state = state

    @property
    def state_slots(self) -> SlotAllocator | None:
        return self.state.allocator if self.state is not None else None

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
