"""Attention over the paged KV cache.

A step's new tokens are a flat array [N]. For attention they are regrouped: all decode
tokens (one per sequence) form one padded group, each prefill chunk forms its own, so
no group pads a long prefill against many short decodes. Each group gathers its keys
from the cache by slot and runs one scaled-dot-product attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ktengine.config import ModelConfig, QKNorm
from ktengine.model.layers import Linear, RMSNorm
from ktengine.model.rope import RotaryEmbedding
from ktengine.state_cache import StateMetadata


@dataclass
class AttentionGroup:
    query_index: torch.Tensor  # [B, Q] rows of the flat token array (padding: any valid row)
    key_slots: torch.Tensor  # [B, C] cache slots of the keys each row attends to (padding: 0)
    mask: torch.Tensor  # [B, 1, Q, C] True = attend
    out_rows: torch.Tensor  # [n] positions in the flattened [B * Q] output of the real tokens
    token_rows: torch.Tensor  # [n] rows of the flat token array they go to


@dataclass
class DecodeTables:
    """A decode-only step in fixed shapes (what a CUDA graph replays): row b is sequence b's
    one new token, which attends to its first context_lens[b] positions."""

    block_tables: torch.Tensor  # [B, max_blocks] int64 (padding: any valid block)
    context_lens: torch.Tensor  # [B] int64, >= 1
    block_size: int


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [N] int64
    slot_mapping: torch.Tensor  # [N] int64: cache slot each new token's K/V is written to
    groups: list[AttentionGroup]
    state: StateMetadata | None = None  # models with linear-attention layers only
    decode: DecodeTables | None = None  # set instead of groups for fixed-shape decode steps
    sliding_window: int | None = None  # used with `decode` (groups carry it in their masks)


def build_group(
    seq_token_starts: list[int],
    seq_q_lens: list[int],
    seq_positions_start: list[int],
    seq_key_slots: list[list[int]],
    sliding_window: int | None,
    device: torch.device,
) -> AttentionGroup:
    """One padded attention group for the given sequences (all lists are per sequence).

    seq_key_slots[b] are the slots of positions 0 .. start+q_len-1 of sequence b.
    """
    num_seqs = len(seq_q_lens)
    max_q = max(seq_q_lens)
    max_c = max(len(s) for s in seq_key_slots)
    query_index = torch.zeros(num_seqs, max_q, dtype=torch.int64)
    key_slots = torch.zeros(num_seqs, max_c, dtype=torch.int64)
    q_pos = torch.full((num_seqs, max_q), -1, dtype=torch.int64)
    ctx_len = torch.zeros(num_seqs, 1, dtype=torch.int64)
    out_rows, token_rows = [], []
    for b in range(num_seqs):
        q, start, row0 = seq_q_lens[b], seq_positions_start[b], seq_token_starts[b]
        query_index[b, :q] = torch.arange(row0, row0 + q)
        query_index[b, q:] = row0
        key_slots[b, : len(seq_key_slots[b])] = torch.tensor(seq_key_slots[b], dtype=torch.int64)
        q_pos[b, :q] = torch.arange(start, start + q)
        ctx_len[b] = len(seq_key_slots[b])
        out_rows.extend(range(b * max_q, b * max_q + q))
        token_rows.extend(range(row0, row0 + q))
    k_pos = torch.arange(max_c)[None, None, :]  # [1, 1, C]
    qp = q_pos[:, :, None]  # [B, Q, 1]
    mask = (k_pos <= qp) & (k_pos < ctx_len[:, :, None])
    if sliding_window is not None:
        mask &= qp - k_pos < sliding_window
    mask[:, :, 0] |= qp[:, :, 0] < 0  # padded query rows attend to one key (never NaN)
    return AttentionGroup(
        query_index=query_index.to(device),
        key_slots=key_slots.to(device),
        mask=mask[:, None].to(device),
        out_rows=torch.tensor(out_rows, dtype=torch.int64, device=device),
        token_rows=torch.tensor(token_rows, dtype=torch.int64, device=device),
    )


class Attention(torch.nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        c, dt = config, config.dtype
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.q_proj = Linear(c.hidden_size, q_size, c.attention_bias, dt)
        self.k_proj = Linear(c.hidden_size, kv_size, c.attention_bias, dt)
        self.v_proj = Linear(c.hidden_size, kv_size, c.attention_bias, dt)
        self.o_proj = Linear(q_size, c.hidden_size, False, dt)
        self.qk_norm = c.qk_norm
        if c.qk_norm == QKNorm.PER_HEAD:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dt)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dt)
        elif c.qk_norm == QKNorm.FULL:
            self.q_norm = RMSNorm(q_size, c.rms_norm_eps, dt)
            self.k_norm = RMSNorm(kv_size, c.rms_norm_eps, dt)
        self.clip_qkv = c.clip_qkv
        self.scale = c.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kv: tuple[torch.Tensor, torch.Tensor],  # k, v caches [num_slots, kv_heads, head_dim]
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == QKNorm.FULL:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm == QKNorm.PER_HEAD:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos_sin
        q, k = RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin)
        return self.o_proj(paged_attention(q, k, v, meta, kv, self.scale).view(n, -1))


def paged_attention(
    q: torch.Tensor,  # [N, heads, D]
    k: torch.Tensor,  # [N, kv_heads, D]
    v: torch.Tensor,  # [N, kv_heads, D]
    meta: AttentionMetadata,
    kv: tuple[torch.Tensor, torch.Tensor],  # k, v caches [num_slots, kv_heads, D]
    scale: float,
) -> torch.Tensor:
    """Writes the new K/V into the cache, then attends group by group; returns [N, heads, D]."""
    k_cache, v_cache = kv
    k_cache[meta.slot_mapping] = k.to(k_cache.dtype)
    v_cache[meta.slot_mapping] = v.to(v_cache.dtype)
    if meta.decode is not None:
        return decode_attention(q, k_cache, v_cache, meta.decode, scale, meta.sliding_window)
    num_heads, head_dim = q.shape[1], q.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for g in meta.groups:
        qg = q[g.query_index].transpose(1, 2)  # [B, heads, Q, D]
        kg = k_cache[g.key_slots].transpose(1, 2)  # [B, kv_heads, C, D]
        vg = v_cache[g.key_slots].transpose(1, 2)
        og = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=g.mask, scale=scale, enable_gqa=num_heads != k.shape[1],
        )  # [B, heads, Q, D]
        og = og.transpose(1, 2).reshape(-1, num_heads, head_dim)
        out[g.token_rows] = og[g.out_rows]
    return out


def decode_attention(
    q: torch.Tensor,  # [B, heads, D]: one new token per sequence
    k_cache: torch.Tensor,  # [num_slots, kv_heads, D]
    v_cache: torch.Tensor,
    tables: DecodeTables,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Decode attention in fixed shapes and without host syncs; returns [B, heads, D].

    Gathers max_blocks * block_size keys per sequence and masks those at or past its context
    length, so the cost follows the padded length: the caller buckets it.
    """
    b, num_heads, _ = q.shape
    bs = tables.block_size
    offsets = torch.arange(bs, device=q.device)
    slots = (tables.block_tables[:, :, None] * bs + offsets).reshape(b, -1)  # [B, C]
    kg = k_cache[slots].transpose(1, 2)  # [B, kv_heads, C, D]
    vg = v_cache[slots].transpose(1, 2)
    k_pos = torch.arange(slots.shape[1], device=q.device)[None, :]  # [1, C]
    ctx = tables.context_lens[:, None]  # [B, 1]
    mask = k_pos < ctx
    if sliding_window is not None:
        mask &= (ctx - 1) - k_pos < sliding_window
    out = F.scaled_dot_product_attention(
        q[:, :, None, :].to(kg.dtype), kg, vg, attn_mask=mask[:, None, None, :], scale=scale,
        enable_gqa=num_heads != kg.shape[1],
    )  # [B, heads, 1, D]
    return out[:, :, 0, :].to(q.dtype)
