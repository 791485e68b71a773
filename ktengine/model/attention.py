"""Attention over the paged KV cache.

A step's new tokens are a flat array [N]. For attention they are regrouped: all decode
tokens (one per sequence) form one padded group, each prefill chunk forms its own, so
no group pads a long prefill against many short decodes. Each group gathers its keys
from the cache by slot and runs one scaled-dot-product attention.

A group of one sequence (a prefill chunk, or a lone decode) without a sliding window
needs no mask: its Q queries are the last Q of its C keys, a causal mask aligned to the
lower right, which flash attention takes without one. These eager groups never use
cuDNN's attention: it builds an execution plan for every new shape (tens of ms each,
measured on an H200), and prompt lengths make nearly every prefill chunk a new shape.
The fixed shapes of graph-captured decode steps leave it free to. A masked decode group
with grouped K/V heads runs `grouped_decode_attention` (two products, no K/V repeated per
query head), since without cuDNN SDPA would take its math kernel, which repeats them.

Graph-captured decode steps on CUDA take, by default (KTENGINE_TRITON_DECODE_ATTENTION), the
Triton paged kernel of decode_attention_triton.py: it reads the block tables itself and loops
over each row's real keys, where the torch path gathers the keys of the whole context bucket
and runs SDPA over them under a mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from ktengine import env
from ktengine.config import ModelConfig, QKNorm
from ktengine.model.layers import Linear, RMSNorm
from ktengine.model.rope import RotaryEmbedding
from ktengine.state_cache import StateMetadata


@dataclass
class AttentionGroup:
    query_index: torch.Tensor  # [B, Q] rows of the flat token array (padding: any valid row)
    key_slots: torch.Tensor  # [B, C] cache slots of the keys each row attends to (padding: 0)
    mask: torch.Tensor | None  # [B, 1, Q, C] True = attend; None: B = 1, causal lower-right
    out_rows: torch.Tensor  # [n] positions in the flattened [B * Q] output of the real tokens
    token_rows: torch.Tensor  # [n] rows of the flat token array they go to


@dataclass
class DecodeTables:
    """A decode-only step in fixed shapes (what a CUDA graph replays): row b is sequence b's
    one new token, which attends to its first context_lens[b] positions (its last
    sliding_window of them, given one). Built once per step and shared by every layer."""

    block_tables: torch.Tensor  # [B, max_blocks] int64 (padding: any valid block)
    context_lens: torch.Tensor  # [B] >= 1
    block_size: int
    sliding_window: int | None
    # the torch path's gathered keys; None on the Triton path, which reads the block tables
    slots: torch.Tensor | None  # [B, C] cache slots of each row's key positions 0..C-1
    mask: torch.Tensor | None  # [B, 1, 1, C] True = attend
    compiled: bool = False  # MoE layers run their attention and routing through torch.compile
    triton: bool = False  # decode_attention runs the Triton paged kernel

    @classmethod
    def build(cls, block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
              sliding_window: int | None = None, compiled: bool = False) -> DecodeTables:
        """block_tables [B, max_blocks] int64 (padding: any valid block), context_lens [B] >= 1.

        On CUDA with KTENGINE_TRITON_DECODE_ATTENTION on (the default) and triton importable,
        the step takes the Triton kernel and the slots and mask are not built (kernels a graph
        step would run for nothing)."""
        if _triton_available(block_tables.device):
            return cls(block_tables, context_lens, block_size, sliding_window, None, None,
                       compiled, triton=True)
        slots, mask = _gathered_keys(block_tables, context_lens, block_size, sliding_window)
        return cls(block_tables, context_lens, block_size, sliding_window, slots, mask, compiled)


def _triton_available(device: torch.device) -> bool:
    """True if decode steps on `device` take the Triton paged kernel: CUDA of sm_80 or newer
    (bf16 tl.dot), the switch on, triton importable (the import registers its op)."""
    if device.type != "cuda" or not env.triton_decode_attention():
        return False  # checked before the import: a CPU run does not load triton
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False
    try:
        import ktengine.model.decode_attention_triton  # noqa: F401
    except ImportError:
        return False
    return True


def _gathered_keys(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                   sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path's key slots [B, C] and mask [B, 1, 1, C] (C = max_blocks · block_size)."""
    b = block_tables.shape[0]
    offsets = torch.arange(block_size, device=block_tables.device)
    slots = (block_tables[:, :, None] * block_size + offsets).reshape(b, -1)
    k_pos = torch.arange(slots.shape[1], device=block_tables.device)[None, :]
    ctx = context_lens[:, None]
    mask = k_pos < ctx
    if sliding_window is not None:
        mask &= (ctx - 1) - k_pos < sliding_window
    return slots, mask[:, None, None, :]


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [N] int64
    slot_mapping: torch.Tensor  # [N] int64: cache slot each new token's K/V is written to
    groups: list[AttentionGroup]
    state: StateMetadata | None = None  # models with linear-attention layers only
    decode: DecodeTables | None = None  # set instead of groups for fixed-shape decode steps


def build_group(
    seq_token_starts: list[int],
    seq_q_lens: list[int],
    seq_positions_start: list[int],
    seq_keys: list[list[int]],
    sliding_window: int | None,
    device: torch.device,
    block_size: int | None = None,
) -> AttentionGroup:
    """One padded attention group for the given sequences (all lists are per sequence).

    seq_keys[b]: the slots of positions 0 .. start+q_len-1 of sequence b; or, given
    block_size, its block table (at least the blocks that cover those positions), so that the
    host work per sequence is O(blocks), not O(keys).
    One sequence and no sliding window: no mask (see the module's notes).
    """
    num_seqs = len(seq_q_lens)
    q_lens = torch.tensor(seq_q_lens, dtype=torch.int64)[:, None]  # [B, 1]
    starts = torch.tensor(seq_positions_start, dtype=torch.int64)[:, None]
    row0 = torch.tensor(seq_token_starts, dtype=torch.int64)[:, None]
    max_q = max(seq_q_lens)
    if block_size is None:
        lens = [len(k) for k in seq_keys]
        max_c = max(lens)
        flat = [slot for keys, n in zip(seq_keys, lens, strict=True) for slot in (*keys, *[0] * (max_c - n))]
        key_slots = torch.tensor(flat, dtype=torch.int64).view(num_seqs, max_c)
        ctx_len = torch.tensor(lens, dtype=torch.int64)[:, None]
    else:
        ctx_len = starts + q_lens
        max_c = int(ctx_len.max())
        nb = -(-max_c // block_size)
        flat = [blk for table in seq_keys for blk in (*table[:nb], *[0] * (nb - min(nb, len(table))))]
        tables = torch.tensor(flat, dtype=torch.int64).view(num_seqs, nb)
        offsets = torch.arange(block_size, dtype=torch.int64)
        key_slots = (tables[:, :, None] * block_size + offsets).reshape(num_seqs, -1)[:, :max_c]
        key_slots = key_slots.masked_fill(torch.arange(max_c)[None, :] >= ctx_len, 0)
    j = torch.arange(max_q, dtype=torch.int64)[None, :]  # [1, Q]
    real = j < q_lens  # [B, Q]: the sequence's own query rows; the rest is padding
    query_index = row0 + torch.where(real, j, 0)  # padding rows repeat the first row
    mask = None
    if num_seqs > 1 or sliding_window is not None:
        q_pos = torch.where(real, starts + j, -1)
        k_pos = torch.arange(max_c)[None, None, :]  # [1, 1, C]
        qp = q_pos[:, :, None]  # [B, Q, 1]
        mask = (k_pos <= qp) & (k_pos < ctx_len[:, :, None])
        if sliding_window is not None:
            mask &= qp - k_pos < sliding_window
        mask[:, :, 0] |= qp[:, :, 0] < 0  # padded query rows attend to one key (never NaN)
        mask = mask[:, None].to(device)
    real = real.flatten()
    return AttentionGroup(
        query_index=query_index.to(device),
        key_slots=key_slots.to(device),
        mask=mask,
        out_rows=torch.nonzero(real)[:, 0].to(device),
        token_rows=query_index.flatten()[real].to(device),
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
        self.o_proj = Linear(q_size, c.hidden_size, c.o_proj_bias, dt)
        self.qk_norm = c.qk_norm
        if c.qk_norm == QKNorm.PER_HEAD:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dt)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dt)
        elif c.qk_norm == QKNorm.FULL:
            self.q_norm = RMSNorm(q_size, c.rms_norm_eps, dt)
            self.k_norm = RMSNorm(kv_size, c.rms_norm_eps, dt)
        self.clip_qkv = c.clip_qkv
        self.scale = c.head_dim**-0.5
        self.qkv: Linear | None = None  # q, k and v projections as one product (fuse_qkv)

    def fuse_qkv(self) -> None:
        """One matrix product for q, k and v instead of three (their weights become views of
        the fused one, so nothing is held twice)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if self.qkv is not None or any(type(p) is not Linear for p in projs):
            return
        weight = torch.cat([p.weight.data for p in projs])
        bias = torch.cat([p.bias.data for p in projs]) if self.q_proj.bias is not None else None
        fused = Linear(weight.shape[1], weight.shape[0], bias is not None, weight.dtype)
        fused.weight.data = weight
        if bias is not None:
            fused.bias.data = bias
        sizes = [p.weight.shape[0] for p in projs]
        for p, w in zip(projs, weight.split(sizes), strict=True):
            p.weight.data = w
        if bias is not None:
            for p, b in zip(projs, bias.split(sizes), strict=True):
                p.bias.data = b
        self.qkv = fused
        self._qkv_sizes = sizes

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kv: tuple[torch.Tensor, torch.Tensor],  # k, v caches [num_slots, kv_heads, head_dim]
    ) -> torch.Tensor:
        n = x.shape[0]
        if self.qkv is not None:
            q, k, v = self.qkv(x).split(self._qkv_sizes, dim=-1)
        else:
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
        gqa = self.num_heads != self.num_kv_heads
        return self.o_proj(paged_attention(q, k, v, meta, kv, self.scale, gqa).view(n, -1))


# kernels for the eager groups: no per-shape plans (see the module's notes)
EAGER_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def paged_attention(
    q: torch.Tensor,  # [N, heads, D]
    k: torch.Tensor,  # [N, kv_heads, D]
    v: torch.Tensor,  # [N, kv_heads, D]
    meta: AttentionMetadata,
    kv: tuple[torch.Tensor, torch.Tensor],  # k, v caches [num_slots, kv_heads, D]
    scale: float,
    gqa: bool | None = None,  # heads != kv_heads (None: read from the shapes)
) -> torch.Tensor:
    """Writes the new K/V into the cache, then attends group by group; returns [N, heads, D]."""
    k_cache, v_cache = kv
    k_cache[meta.slot_mapping] = k.to(k_cache.dtype)
    v_cache[meta.slot_mapping] = v.to(v_cache.dtype)
    if meta.decode is not None:
        return decode_attention(q, k_cache, v_cache, meta.decode, scale, gqa)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    with sdpa_kernel(EAGER_BACKENDS):  # once: entering it costs about 30 µs of host time
        for g in meta.groups:
            _attend_group(q, k_cache, v_cache, g, scale, out)
    return out


def _attend_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  g: AttentionGroup, scale: float, out: torch.Tensor) -> None:
    """One group's attention, written into its rows of out [N, heads, D]."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    qg = q[g.query_index].transpose(1, 2)  # [B, heads, Q, D]
    kg = k_cache[g.key_slots].transpose(1, 2)  # [B, kv_heads, C, D]
    vg = v_cache[g.key_slots].transpose(1, 2)
    mask, causal = g.mask, False
    if mask is not None and qg.shape[2] == 1 and num_heads != kg.shape[1]:
        og = grouped_decode_attention(qg, kg, vg, mask, scale)
    else:
        if mask is None:  # one sequence: its queries are the last Q of its C keys
            q_len, c_len = qg.shape[2], kg.shape[2]
            causal = q_len == c_len > 1
            if 1 < q_len < c_len:
                mask = causal_lower_right(q_len, c_len)
        og = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=mask, is_causal=causal, scale=scale,
            enable_gqa=num_heads != kg.shape[1],
        )  # [B, heads, Q, D]
    out[g.token_rows] = og.transpose(1, 2).reshape(-1, num_heads, head_dim)[g.out_rows]


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked attention of one query per row with grouped K/V heads, without repeating K/V
    per query head (the math kernel does: heads/kv_heads times the gathered keys' memory):
    q [B, heads, 1, D], k/v [B, kv_heads, C, D], mask [B, 1, 1, C]; returns [B, heads, 1, D].
    Query head h reads K/V head h // (heads / kv_heads), softmax in fp32."""
    b, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(b, kv_heads, heads // kv_heads, dim)  # [B, kv_heads, rep, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, kv_heads, rep, C]
    scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(p, v).reshape(b, heads, 1, dim)


def decode_attention(
    q: torch.Tensor,  # [B, heads, D]: one new token per sequence
    k_cache: torch.Tensor,  # [num_slots, kv_heads, D]
    v_cache: torch.Tensor,
    tables: DecodeTables,
    scale: float,
    gqa: bool | None = None,
) -> torch.Tensor:
    """Decode attention in fixed shapes and without host syncs; returns [B, heads, D].

    Tables built for the Triton kernel (DecodeTables.build decides) run it, for every shape it
    serves: its cost follows each row's context. Otherwise gathers C keys per sequence and
    masks those past its context, so the cost follows the padded length C: the caller
    buckets it.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    slots, mask = tables.slots, tables.mask
    if tables.triton:
        from ktengine.model import decode_attention_triton as kernel

        if kernel.supports(head_dim, num_heads, k_cache.shape[1], k_cache.dtype):
            return kernel.paged_decode_attention(
                q, k_cache, v_cache, tables.block_tables, tables.context_lens,
                tables.block_size, scale, tables.sliding_window)
    if slots is None:  # a shape the kernel does not serve: gather after all
        slots, mask = _gathered_keys(tables.block_tables, tables.context_lens,
                                     tables.block_size, tables.sliding_window)
    kg = k_cache[slots].transpose(1, 2)  # [B, kv_heads, C, D]
    vg = v_cache[slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :].to(kg.dtype), kg, vg, attn_mask=mask, scale=scale,
        enable_gqa=num_heads != kg.shape[1] if gqa is None else gqa,
    )  # [B, heads, 1, D]
    return out[:, :, 0, :].to(q.dtype)
