"""Per-request recurrent state of linear-attention layers: a pool of slots and its allocator.

A Gated DeltaNet layer keeps no K/V entries; per sequence it keeps the last K-1 inputs of its
causal convolution and the delta-rule state [value_heads, key_head_dim, value_head_dim]. Each
running sequence owns one slot (a row of every linear layer's state tensors) from admission
until it finishes, is aborted or is preempted. A slot is never cleared: a sequence's first
chunk starts from zero state (StateMetadata says so) and overwrites the slot, so a preempted
sequence that comes back and recomputes from scratch cannot see stale state.

SlotAllocator is plain Python, like BlockAllocator, so the scheduler stays cheap to test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ktengine.config import LinearAttentionConfig, ModelConfig


class SlotAllocator:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be positive")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise MemoryError("state cache: no free slot")
        return self._free.pop()

    def free(self, slot: int) -> None:
        self._free.append(slot)


class StateCache:
    """Per linear layer: conv state [slots, conv_dim, K-1] (model dtype) and delta-rule state
    [slots, value_heads, key_head_dim, value_head_dim] (fp32, as transformers keeps it)."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        linear: LinearAttentionConfig,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        # one slot more than handed out: fixed-shape decode steps (CUDA graphs) run their
        # padding rows on it
        conv_shape = (num_slots + 1, linear.conv_dim, linear.conv_kernel_size - 1)
        rec_shape = (num_slots + 1, linear.num_value_heads, linear.key_head_dim, linear.value_head_dim)
        self.scratch_slot = num_slots
        self.layers = [
            (
                torch.zeros(conv_shape, dtype=dtype, device=device),
                torch.zeros(rec_shape, dtype=torch.float32, device=device),
            )
            for _ in range(num_layers)
        ]
        self.allocator = SlotAllocator(num_slots)

    @staticmethod
    def bytes_per_slot(num_layers: int, linear: LinearAttentionConfig, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        conv = linear.conv_dim * (linear.conv_kernel_size - 1) * elem
        rec = linear.num_value_heads * linear.key_head_dim * linear.value_head_dim * 4
        return num_layers * (conv + rec)


def layer_caches(config: ModelConfig, kv_layers: list, state: StateCache | None) -> list:
    """One cache entry per hidden layer: (k, v) for attention layers, (conv, recurrent) for
    linear ones. kv_layers holds only the attention layers' entries, in order."""
    if state is None:
        return kv_layers
    kv, rec, linear = iter(kv_layers), iter(state.layers), set(config.linear_layer_ids)
    return [next(rec) if i in linear else next(kv) for i in range(config.num_layers)]


@dataclass
class StateMetadata:
    """Where each scheduled sequence's tokens are and which state slot they read and update.

    Single-token sequences (decodes) are run together in one recurrent step; each longer one
    (a prefill chunk) runs the chunked form on its own.
    """

    decode_rows: torch.Tensor  # [B] rows of the flat token array
    decode_slots: torch.Tensor  # [B]
    decode_has_state: torch.Tensor  # [B] bool: False = start from zero state
    prefills: list[tuple[int, int, int, bool]]  # (first row, num tokens, slot, has_state)


def build_state_metadata(
    seqs: list[tuple[int, int, int, bool]], device: torch.device
) -> StateMetadata:
    """seqs: per scheduled sequence (first row, num tokens, slot, has_state)."""
    decodes = [s for s in seqs if s[1] == 1]
    return StateMetadata(
        decode_rows=torch.tensor([s[0] for s in decodes], dtype=torch.int64, device=device),
        decode_slots=torch.tensor([s[2] for s in decodes], dtype=torch.int64, device=device),
        decode_has_state=torch.tensor([s[3] for s in decodes], dtype=torch.bool, device=device),
        prefills=[s for s in seqs if s[1] > 1],
    )
