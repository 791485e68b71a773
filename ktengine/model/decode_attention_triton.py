"""Paged decode attention as Triton kernels that read the block tables themselves.

Replaces, for graph-captured decode steps on CUDA, the torch path of attention.decode_attention:
there every layer gathered C = max_blocks·block_size keys per row from the paged cache (two
gather kernels, ~2.7 µs per layer at batch 1 on an H200) and ran cuDNN's SDPA over all C of
them under a mask (~8.8 µs), so a 40-token context paid for the 256 keys of the smallest
bucket. Here each program reads its row's context length and loops over the real keys only,
finding each key's slot through the block table: cost follows the context, not the bucket.

  kernel 1, grid (B, kv_heads, num_splits): flash-decoding. Program (b, g, s) takes the keys
      s·split_keys .. (s+1)·split_keys - 1 of row b that lie in [max(0, ctx - window), ctx),
      for all the query heads of KV head g at once (each K/V tile is read once per group), and
      writes a partial (max, sum, acc) per query head; a split with no such keys writes an
      empty one (max -inf, sum 0, acc 0). With one split it writes the output itself.
  kernel 2, grid (B, heads), only with several splits: merges a row's partials.

The number of splits depends on shapes only (batch, KV heads, max_blocks, block_size), never on
the contexts, and nothing syncs with the host or allocates by data: the calls are captured in
CUDA graphs. Keys per split (split_keys_for): the smallest context bucket (16 blocks of 16, 256
keys) is one split, so short contexts take one kernel; beyond it splits of 128 keys when a split
has at most 8 programs (batch × KV heads: batch 1 and 2 of Qwen3-30B-A3B's 4), else 256. Only
two guards for torch.compile, both settled by each batch bucket's first two context buckets
(what decode_graphs warms up at start-up), none by longer contexts.

Measured on an H200 (torch 2.11, triton 3.6; Qwen3-30B-A3B's 32/4 heads, D 128, bf16; 20 calls
per graph, torch path = decode_attention's gather + SDPA; keys per split 64 / 128 / 256 / 512):
  batch 1:  40 keys (bucket 256): 6.1 / 6.0 / 3.7 / 3.7 µs (one split from 256; torch 14.5)
            300 (512): 6.5 / 7.7 / 10.6 / 10.1;  1000 (1024): 6.9 / 8.1 / 10.9 / 16.6
            8192: 15.3 / 12.4 / 12.7 / 17.8 (torch 30.2)
  batch 8:  300: 7.9 / 8.6 / 11.3 / 10.5;  1000: 10.4 / 10.2 / 11.9 / 17.5
            8192: 61 / 51 / 46 / 42 µs (torch 132; 2.9 TB/s of K/V at 256)
  batch 32: 300: 15.4 / 13.4 / 14.7 / 11.0;  8192: 199 / 164 / 154 / 145 (torch 458)
More pipeline stages, wider tiles or loads issued a tile ahead by hand were slower.

Scores q·k (fp32 accumulation), times the scale, softmax in fp32 (online, in base 2), the
probabilities rounded to the cache dtype for the P·V product (as flash attention does),
accumulated in fp32, cast to q's dtype. Both products use tl.dot: the query heads of a group
are padded to 16 rows (tl.dot's minimum; Qwen3-30B-A3B's group is 8) with masked loads and
stores, which costs nothing that matters here: decode attention is bound by reading K/V.

Registered as the custom op ktengine::paged_decode_attention (torch.library.triton_op), so that
torch.compile(fullgraph=True) traces through it to the kernels. Importing this module needs
triton; `TRITON_INTERPRET=1` runs it on CPU tensors (tests).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ktengine import env

SPLIT_KEYS = 256  # keys per split, and the keys up to which one split does (module's notes)
SMALL_SPLIT_KEYS = 128  # keys per split when a split has few programs
COMBINE_CHUNK = 16  # splits the combine kernel reads at a time
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def supports(head_dim: int, num_heads: int, num_kv_heads: int, dtype: torch.dtype) -> bool:
    """True if the kernels serve these shapes and cache dtype: head_dim a power of two from 16
    (tl.dot's minimum) to 256, whole groups of query heads per KV head."""
    return (16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0
            and num_heads % num_kv_heads == 0 and dtype in DTYPES)


def split_keys_for(programs_per_split: int, max_keys: int) -> int:
    """Keys per split for a grid of `programs_per_split` (batch × KV heads) programs per split
    over a bucket of max_keys keys (see the module's notes for the figures)."""
    if max_keys <= SPLIT_KEYS:
        return SPLIT_KEYS
    return SMALL_SPLIT_KEYS if programs_per_split <= 8 else SPLIT_KEYS


def _launch_config(head_dim: int, itemsize: int) -> tuple[int, int, int]:
    """(keys per tile, num_warps, num_stages) of the split kernel. 16 KB of K per tile: 64 keys
    of 128 bf16, 32 at D = 256, 16 to 64 (see the module's notes for what else was tried)."""
    return max(16, min(64, 16384 // (head_dim * itemsize))), 4, 2


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, ctx_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    qk_scale, window, block_size, max_keys, split_keys, num_heads, num_splits,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tb,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    ONE_SPLIT: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes a float argument as fp64
    # this split's keys: [start, end) of the row's window [lo, ctx)
    ctx = tl.minimum(tl.load(ctx_ptr + b).to(tl.int32), max_keys)
    lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    start = tl.maximum(split * split_keys, lo)
    end = tl.minimum(split * split_keys + split_keys, ctx)

    rows = tl.arange(0, BLOCK_G)  # [BG] the group's query heads, padded to BLOCK_G
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)  # [D]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)  # [BG, D]
    q = q.to(k_ptr.dtype.element_ty)
    if DOT_F32:  # the interpreter's tl.dot multiplies 16-bit bit patterns (triton#11584)
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)  # running max, base-2 scaled scores
    l_i = tl.zeros((BLOCK_G,), tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)  # running sum of exp2(score - m_i) · v
    cols = tl.arange(0, BLOCK_N)
    table_row = tables_ptr + b.to(tl.int64) * stride_tb
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    for n0 in range(start, end, BLOCK_N):  # every tile holds at least one key: m_i finite after
        pos = n0 + cols  # [BN] key positions
        key_ok = pos < end
        block = tl.load(table_row + pos // block_size, mask=key_ok, other=0)  # [BN]
        slot = block.to(tl.int64) * block_size + pos % block_size  # [BN]
        k = tl.load(k_head + slot[None, :] * stride_ks + dims[:, None],
                    mask=key_ok[None, :], other=0.0)  # [D, BN]
        v = tl.load(v_head + slot[:, None] * stride_vs + dims[None, :],
                    mask=key_ok[:, None], other=0.0)  # [BN, D]
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:  # fp32 caches: fp32 products, as torch computes them
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)  # [BG, BN] fp32
        s = tl.where(key_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        p = tl.exp2(s - m_new[:, None])  # [BG, BN]
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v_ptr.dtype.element_ty)
        if DOT_F32:
            p = p.to(tl.float32)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p, v)  # [BG, D] fp32
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if ONE_SPLIT:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i = 0 only for a row without keys
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (b.to(tl.int64) * num_heads + heads) * num_splits + split  # [BG]
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc,
                 mask=row_ok[:, None])


@triton.jit
def _combine_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, num_heads, num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    base = (b.to(tl.int64) * num_heads + head) * num_splits  # this row's first partial
    splits = tl.arange(0, CHUNK)
    dims = tl.arange(0, HEAD_DIM)
    m_max = tl.full((CHUNK,), float("-inf"), tl.float32)
    for s0 in range(0, num_splits, CHUNK):
        ok = s0 + splits < num_splits
        m_max = tl.maximum(m_max, tl.load(part_m_ptr + base + s0 + splits, mask=ok,
                                          other=float("-inf")))
    m = tl.max(m_max, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no split held a key: every weight below is 0
    l_sum = tl.zeros((CHUNK,), tl.float32)
    acc = tl.zeros((CHUNK, HEAD_DIM), tl.float32)
    for s0 in range(0, num_splits, CHUNK):
        ok = s0 + splits < num_splits
        w = tl.exp2(tl.load(part_m_ptr + base + s0 + splits, mask=ok, other=float("-inf")) - m)
        l_sum += w * tl.load(part_l_ptr + base + s0 + splits, mask=ok, other=0.0)
        a = tl.load(part_acc_ptr + (base + s0 + splits)[:, None] * HEAD_DIM + dims[None, :],
                    mask=ok[:, None], other=0.0)  # [CHUNK, D]
        acc += w[:, None] * a
    total = tl.sum(l_sum, 0)
    o = tl.sum(acc, 0) / tl.where(total > 0, total, 1.0)  # [D]
    tl.store(out_ptr + b * stride_ob + head * stride_oh + dims, o.to(out_ptr.dtype.element_ty))


@triton_op("ktengine::paged_decode_attention", mutates_args=())
def _paged_decode_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, block_size: int, scale: float, sliding_window: int,
    split_keys: int,
) -> torch.Tensor:
    # Traced by torch.compile with fake tensors and symbolic shapes: whatever becomes a
    # constexpr is made a plain int (a guard on it); batch and max_blocks stay symbolic.
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    max_blocks = block_tables.shape[1]
    assert supports(head_dim, num_heads, num_kv_heads, k_cache.dtype), (q.shape, k_cache.dtype)
    assert k_cache.shape[2] == head_dim and v_cache.shape == k_cache.shape, (
        k_cache.shape, v_cache.shape)
    assert v_cache.dtype == k_cache.dtype, (k_cache.dtype, v_cache.dtype)
    assert block_tables.shape[0] == batch and context_lens.shape == (batch,), (
        block_tables.shape, context_lens.shape)
    assert split_keys >= 0
    if q.stride(2) != 1:  # the kernel takes any row and head strides
        q = q.contiguous()
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    assert k_cache.stride(2) == 1 and v_cache.stride(2) == 1, (k_cache.stride(), v_cache.stride())
    group = int(num_heads // num_kv_heads)
    max_keys = max_blocks * block_size
    if split_keys == 0:  # from the shapes
        split_keys = split_keys_for(batch * num_kv_heads, max_keys)
    num_splits = (max_keys + split_keys - 1) // split_keys
    one_split = bool(num_splits == 1)
    out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    # [B, heads, splits] partials; with one split the kernel writes `out` and never reads them
    part_m = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32,
                           device=q.device)
    block_n, num_warps, num_stages = _launch_config(int(head_dim), k_cache.element_size())
    # wrap_triton: what torch.compile traces (and finds the kernels' sources by, for its cache
    # keys: keep the calls literal). Under Triton's interpreter nothing traces, and torch
    # before 2.13 refuses to wrap the interpreter's functions.
    if env.triton_interpreter():
        split_kernel, combine_kernel = _split_kernel, _combine_kernel
    else:
        split_kernel, combine_kernel = wrap_triton(_split_kernel), wrap_triton(_combine_kernel)
    split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_m, part_l, part_acc,
        scale * math.log2(math.e), sliding_window, block_size, max_keys, split_keys,
        num_heads, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
        v_cache.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=int(head_dim),
        BLOCK_N=block_n, ONE_SPLIT=one_split, DOT_F32=not q.is_cuda,
        IEEE=k_cache.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages,
    )
    if not one_split:
        combine_kernel[(batch, num_heads)](
            part_m, part_l, part_acc, out, num_heads, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=int(head_dim), CHUNK=COMBINE_CHUNK, num_warps=4,
        )
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [B, heads, D]: one new token per row
    k_cache: torch.Tensor,  # [num_slots, kv_heads, D], slot = block · block_size + offset
    v_cache: torch.Tensor,  # [num_slots, kv_heads, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int64 (past the context: any valid block)
    context_lens: torch.Tensor,  # [B] int32 or int64, 1 .. max_blocks · block_size
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
    split_keys: int = 0,  # keys per split; 0: split_keys_for the shapes (tests make it small)
) -> torch.Tensor:
    """Attention of each row's query to its key positions max(0, ctx - window) .. ctx - 1
    (window None: 0 .. ctx - 1) in the paged cache; query head h reads KV head
    h // (heads / kv_heads). Returns [B, heads, D] in q's dtype. Fixed grids, no host sync:
    safe to capture in a CUDA graph; traceable by torch.compile(fullgraph=True)."""
    return torch.ops.ktengine.paged_decode_attention(
        q, k_cache, v_cache, block_tables, context_lens, block_size, scale,
        sliding_window or 0, split_keys)
