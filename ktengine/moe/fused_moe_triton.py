"""The GPU-resident experts of one layer as two Triton kernels, grouped by expert slot.

Decode is bound by reading weights, so each routed resident expert's weights are read once per
call (per tile of BLOCK_M of its pairs): no per-pair weight copies, no slot that received
nothing. The T·k (token, expert) pairs are sorted by slot on the device; bucket e of the sorted
order holds slot e's pairs, bucket C the non-resident ones.

  kernel 1, grid (C, I / BLOCK_N): h [P, I] = silu(x · gateᵀ) ⊙ (x · upᵀ), sorted-pair rows
  kernel 2, grid (C + 1, H / BLOCK_N): y [P, H] = w · h · downᵀ (fp32), original-pair rows;
      program C writes the zero rows of the non-resident pairs
  out [T, H] = y.view(T, k, H).sum(1)  (deterministic: no atomics)

A call with fewer pairs than slots (decode over many resident experts) launches its grid by
pair instead, P programs in place of C: program j takes the bucket starting at sorted position
j, if one does. A program with nothing to do still holds an SM slot for its launch; 128 slots
at batch 1 would launch 16× more of those than of programs with work.

No host sync and grids that depend only on shapes: the call is captured into CUDA graphs.
Importing this module needs triton; `TRITON_INTERPRET=1` runs it on CPU tensors (tests).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ktengine import env
from ktengine.moe.gpu_experts import Counters


@dataclass(frozen=True)
class Tiles:
    """Block sizes and launch settings of one kernel (BLOCK_M ≥ 16: tl.dot's minimum)."""

    block_m: int  # pairs per tile
    block_n: int  # output columns per program
    block_k: int  # reduction step
    num_warps: int = 4
    num_stages: int = 3


# Decode: one or two pairs per routed expert, so BLOCK_M is tl.dot's minimum and BLOCK_N is
# narrow, for enough programs: Qwen3-30B-A3B's 8 routed experts of a token give 8·768/32 = 192
# gate/up and 8·2048/32 = 512 down programs for ~132 SMs. Larger calls reuse each weight tile
# over more pairs. Untuned guesses beyond that: tune here.
DECODE_MAX_PAIRS = 256
DECODE_TILES = Tiles(16, 32, 128)
MIDDLE_MAX_PAIRS = 2048
MIDDLE_TILES = Tiles(32, 64, 64)
PREFILL_TILES = Tiles(64, 128, 64, num_warps=8)

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def pick_tiles(num_pairs: int) -> tuple[Tiles, Tiles]:
    """(gate/up kernel, down kernel) tiles for a call of `num_pairs` (token, expert) pairs."""
    if num_pairs <= DECODE_MAX_PAIRS:
        return DECODE_TILES, DECODE_TILES
    if num_pairs <= MIDDLE_MAX_PAIRS:
        return MIDDLE_TILES, MIDDLE_TILES
    return PREFILL_TILES, PREFILL_TILES


def available(device: torch.device | str) -> bool:
    """True if fused_experts runs on `device`: a CUDA GPU of sm_80 or newer (bf16 tl.dot), or
    any device under Triton's interpreter. Triton is importable: this module imported it."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return env.triton_interpreter()


@triton.jit
def _bucket(sorted_ptr, offsets_ptr, num_slots, BY_PAIR: tl.constexpr):
    """(slot, start, end) of this program's bucket of sorted pairs; start == end: none.

    By slot: program i takes slot i's bucket. By pair (calls with fewer pairs than slots):
    program j takes the bucket that starts at sorted position j, if one does, so that the
    grid holds one program per pair, not per slot (decode over many slots would otherwise
    launch mostly programs with nothing to do)."""
    if BY_PAIR:
        start = tl.program_id(0)
        slot = tl.load(sorted_ptr + start).to(tl.int32)
        prev = tl.load(sorted_ptr + start - 1, mask=start > 0, other=-1).to(tl.int32)
        end = tl.where(slot != prev, tl.load(offsets_ptr + slot + 1), start)
    else:
        slot = tl.program_id(0)
        start = tl.load(offsets_ptr + slot)
        end = tl.load(offsets_ptr + slot + 1)
    return slot, start, end


@triton.jit
def _gate_up_kernel(
    x_ptr, gate_ptr, up_ptr, h_ptr, order_ptr, offsets_ptr, sorted_ptr,
    H, I, top_k, num_slots,
    stride_x, stride_we, stride_wi, stride_h,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BY_PAIR: tl.constexpr,
):
    slot, start, end = _bucket(sorted_ptr, offsets_ptr, num_slots, BY_PAIR)
    end = tl.where(slot < num_slots, end, start)  # no products for the non-resident pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] rows of gate/up
    col_ok = cols < I
    ks = tl.arange(0, BLOCK_K)  # [BK]
    w_offs = slot.to(tl.int64) * stride_we + cols[None, :] * stride_wi + ks[:, None]  # [BK, BN]
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)  # [BM] positions in the sorted order
        row_ok = rows < end
        pairs = tl.load(order_ptr + rows, mask=row_ok, other=0)  # [BM] original pair index
        x_ptrs = x_ptr + (pairs // top_k)[:, None] * stride_x + ks[None, :]  # [BM, BK]
        g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k_ok = ks < H - k0
            xt = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            gt = tl.load(gate_ptr + w_offs + k0, mask=w_mask, other=0.0)  # H contiguous
            ut = tl.load(up_ptr + w_offs + k0, mask=w_mask, other=0.0)
            xt = xt.to(DOT_DTYPE)
            g = tl.dot(xt, gt.to(DOT_DTYPE), g, input_precision=PRECISION)
            u = tl.dot(xt, ut.to(DOT_DTYPE), u, input_precision=PRECISION)
        h = g * tl.sigmoid(g) * u  # silu(g) ⊙ u, fp32
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, down_ptr, y_ptr, weights_ptr, order_ptr, offsets_ptr, sorted_ptr,
    num_slots, H, I,
    stride_h, stride_we, stride_wh, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BY_PAIR: tl.constexpr,
):
    # slot num_slots: the non-resident pairs, whose rows are zeros
    slot, start, end = _bucket(sorted_ptr, offsets_ptr, num_slots, BY_PAIR)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] rows of down
    col_ok = cols < H
    ks = tl.arange(0, BLOCK_K)  # [BK]
    i_end = tl.where(slot < num_slots, I, 0)  # the sentinel program computes no products
    w_offs = slot.to(tl.int64) * stride_we + cols[None, :] * stride_wh + ks[:, None]  # [BK, BN]
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)  # [BM] positions in the sorted order
        row_ok = rows < end
        pairs = tl.load(order_ptr + rows, mask=row_ok, other=0)  # [BM] original pair index
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + ks[None, :]  # [BM, BK]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, i_end, BLOCK_K):
            k_ok = ks < I - k0
            ht = tl.load(h_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            dt = tl.load(down_ptr + w_offs + k0, mask=k_ok[:, None] & col_ok[None, :],
                         other=0.0)  # I contiguous
            acc = tl.dot(ht.to(DOT_DTYPE), dt.to(DOT_DTYPE), acc, input_precision=PRECISION)
        w = tl.load(weights_ptr + pairs, mask=row_ok, other=0.0)  # [BM] fp32
        y_ptrs = y_ptr + pairs[:, None] * stride_y + cols[None, :]
        tl.store(y_ptrs, acc * w[:, None], mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _slots_at(ids_ptr, slot_of_ptr, j, P, MAP: tl.constexpr):
    """The slots of pairs j (0 past P): their ids, mapped through slot_of_expert when MAP."""
    s = tl.load(ids_ptr + j, mask=j < P, other=0)
    if MAP:
        s = tl.load(slot_of_ptr + s, mask=j < P, other=0)
    return s


@triton.jit
def _bucket_small_kernel(
    ids_ptr, slot_of_ptr, valid_ptr, gpu_pairs_ptr, routes_ptr,
    sorted_ptr, order_ptr, offsets_ptr, P, top_k, num_slots, num_buckets,
    MAP: tl.constexpr, ROWS: tl.constexpr, COUNT_GPU: tl.constexpr, COUNT_ROUTES: tl.constexpr,
    BLOCK_P: tl.constexpr, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """For P <= BLOCK_P pairs in one program: each pair's slot (its expert id through the
    slot_of_expert table when MAP), the stable sort by slot (pair i's sorted position is the
    number of pairs before it in (slot, index) order), offsets[e] (the pairs with a slot below
    e), and the step's counters over the live pairs (of the rows valid_ptr marks, when ROWS):
    resident pairs into gpu_pairs_ptr, routed pairs per expert into routes_ptr. Quadratic in
    P, one launch where torch takes ~10."""
    i = tl.arange(0, BLOCK_P)
    in_range = i < P
    e_i = tl.load(ids_ptr + i, mask=in_range, other=0)
    s_i = tl.load(slot_of_ptr + e_i, mask=in_range, other=0) if MAP else e_i
    live = in_range
    if ROWS:
        live = live & (tl.load(valid_ptr + i // top_k, mask=in_range, other=0) != 0)
    if COUNT_GPU:
        tl.atomic_add(gpu_pairs_ptr, tl.sum(((s_i < num_slots) & live).to(tl.int64), axis=0))
    if COUNT_ROUTES:
        tl.atomic_add(routes_ptr + e_i, tl.full((BLOCK_P,), 1.0, tl.float32), mask=live)
    rank = tl.zeros((BLOCK_P,), dtype=tl.int32)
    for j0 in range(0, P, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        s_j = _slots_at(ids_ptr, slot_of_ptr, j, P, MAP)
        before = (s_j[None, :] < s_i[:, None]) | ((s_j[None, :] == s_i[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((before & (j < P)[None, :]).to(tl.int32), axis=1)
    tl.store(order_ptr + rank, i.to(tl.int64), mask=in_range)
    tl.store(sorted_ptr + rank, s_i.to(tl.int64), mask=in_range)
    for e0 in range(0, num_buckets, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        below = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for j0 in range(0, P, CHUNK):
            j = j0 + tl.arange(0, CHUNK)
            s_j = _slots_at(ids_ptr, slot_of_ptr, j, P, MAP)
            below += tl.sum(((s_j[None, :] < e[:, None]) & (j < P)[None, :]).to(tl.int32), axis=1)
        tl.store(offsets_ptr + e, below, mask=e < num_buckets)


def sort_into_buckets(ids: torch.Tensor, num_slots: int, slot_of_expert: torch.Tensor | None = None,
                      counters: Counters | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted slots [P] int64, order [P] int64, offsets [C + 2] int32) of the pairs' slots
    (ids [T, k]: slots, or expert ids mapped through slot_of_expert): a stable sort, and
    offsets[e] = the first sorted position of a slot >= e, so that bucket e is
    offsets[e]..offsets[e+1]. Adds the pairs to `counters`. Up to DECODE_MAX_PAIRS pairs in one
    small kernel (torch's gather, sort, searchsorted and counts took ~10 launches, ~19 µs of a
    decode layer on an H200 for the sort alone), else torch."""
    if ids.numel() > DECODE_MAX_PAIRS:
        slots = ids if slot_of_expert is None else slot_of_expert[ids]
        if counters is not None:
            counters.add_torch(ids, slots, num_slots)
        sorted_slots, order = torch.sort(slots.reshape(-1), stable=True)
        buckets = torch.arange(num_slots + 2, device=ids.device, dtype=sorted_slots.dtype)
        return sorted_slots, order, torch.searchsorted(sorted_slots, buckets, out_int32=True)
    flat = ids.reshape(-1).contiguous()
    counters = counters or Counters()
    sorted_slots = torch.empty(flat.numel(), dtype=torch.int64, device=flat.device)
    order = torch.empty_like(sorted_slots)
    offsets = torch.empty(num_slots + 2, dtype=torch.int32, device=flat.device)
    unused = flat  # the pointer a switched-off input gets
    _bucket_small_kernel[(1,)](
        flat, unused if slot_of_expert is None else slot_of_expert,
        unused if counters.valid is None else counters.valid,
        unused if counters.gpu_pairs is None else counters.gpu_pairs,
        unused if counters.routes is None else counters.routes,
        sorted_slots, order, offsets, flat.numel(), ids.shape[-1], num_slots, num_slots + 2,
        MAP=slot_of_expert is not None, ROWS=counters.valid is not None,
        COUNT_GPU=counters.gpu_pairs is not None, COUNT_ROUTES=counters.routes is not None,
        BLOCK_P=DECODE_MAX_PAIRS, CHUNK=32, BLOCK_E=64, num_warps=8)
    return sorted_slots, order, offsets


# pairs per kernel call: a larger call runs in slices of whole tokens, so that its fp32 y
# [pairs, H] stays near 134 MB at H 2048 (a 2048-token chunk at top-8) whatever the chunk size
MAX_PAIRS = 16384


def fused_experts(
    x: torch.Tensor,  # [T, H] bf16/fp16/fp32
    gate: torch.Tensor,  # [C, I, H], x.dtype
    up: torch.Tensor,  # [C, I, H]
    down: torch.Tensor,  # [C, H, I]
    slots: torch.Tensor,  # [T, k] int64 in [0, C]; C: not resident, contributes nothing
    topk_weights: torch.Tensor,  # [T, k] float32
    by_pair: bool | None = None,  # grid by pair or by slot (default: whichever is smaller)
    slot_of_expert: torch.Tensor | None = None,  # given: `slots` are expert ids mapped by it
    counters: Counters | None = None,  # counted on the way (sort_into_buckets)
    reduce: bool = True,  # False: the per-pair rows, fp32 [T, k, H], for the caller to sum
    tiles: tuple[Tiles, Tiles] | None = None,  # (gate/up, down); None: pick_tiles (benchmarks)
) -> torch.Tensor:
    """Sum over each token's resident pairs of w · down(silu(gate·x) ⊙ up·x): [T, H] in x.dtype.

    Accumulates in fp32 (h, the product before `down`, is rounded to x.dtype as in the torch
    path). No host sync; the launch grids depend on shapes only.
    """
    t, hidden = x.shape
    num_slots, inter, _ = gate.shape
    k = slots.shape[1]
    assert gate.shape == up.shape == (num_slots, inter, hidden), (gate.shape, up.shape, x.shape)
    assert down.shape == (num_slots, hidden, inter), down.shape
    assert gate.dtype == up.dtype == down.dtype == x.dtype, (x.dtype, gate.dtype, down.dtype)
    assert all(w.stride(-1) == 1 and w.stride(-2) == w.shape[-1] for w in (gate, up, down))
    num_pairs = t * k
    if num_pairs == 0 or num_slots == 0:
        if counters is not None and num_pairs:
            mapped = slots if slot_of_expert is None else slot_of_expert[slots]
            counters.add_torch(slots, mapped, num_slots)
        return torch.zeros_like(x) if reduce else x.new_zeros(t, k, hidden, dtype=torch.float32)
    if num_pairs > MAX_PAIRS:
        rows = max(1, MAX_PAIRS // k)

        def part(i: int) -> Counters | None:
            if counters is None or counters.valid is None:
                return counters
            return replace(counters, valid=counters.valid[i:i + rows])

        return torch.cat([fused_experts(x[i:i + rows], gate, up, down, slots[i:i + rows],
                                        topk_weights[i:i + rows], by_pair, slot_of_expert, part(i),
                                        reduce, tiles)
                           for i in range(0, t, rows)])
    x = x.contiguous()
    weights = topk_weights.reshape(-1).float().contiguous()  # [P]
    # stable sort: a slot's pairs keep their token order (x rows read in order)
    sorted_slots, order, offsets = sort_into_buckets(slots, num_slots, slot_of_expert, counters)
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)
    up_tiles, down_tiles = tiles or pick_tiles(num_pairs)
    by_pair = num_pairs < num_slots if by_pair is None else by_pair
    programs = num_pairs if by_pair else num_slots
    # Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton#11584): upcast there
    # only (exact: the products of 16-bit values are exact in fp32, accumulated in fp32 anyway)
    dot_dtype = tl.float32 if env.triton_interpreter() else _TL_DTYPES[x.dtype]
    # fp32 inputs are multiplied in fp32, as torch does by default; 16-bit ones ignore this
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _gate_up_kernel[(programs, triton.cdiv(inter, up_tiles.block_n))](
        x, gate, up, h, order, offsets, sorted_slots,
        hidden, inter, k, num_slots,
        x.stride(0), gate.stride(0), gate.stride(1), h.stride(0),
        BLOCK_M=up_tiles.block_m, BLOCK_N=up_tiles.block_n, BLOCK_K=up_tiles.block_k,
        DOT_DTYPE=dot_dtype, PRECISION=precision, BY_PAIR=by_pair,
        num_warps=up_tiles.num_warps, num_stages=up_tiles.num_stages,
    )
    _down_kernel[(programs if by_pair else num_slots + 1, triton.cdiv(hidden, down_tiles.block_n))](
        h, down, y, weights, order, offsets, sorted_slots,
        num_slots, hidden, inter,
        h.stride(0), down.stride(0), down.stride(1), y.stride(0),
        BLOCK_M=down_tiles.block_m, BLOCK_N=down_tiles.block_n, BLOCK_K=down_tiles.block_k,
        DOT_DTYPE=dot_dtype, PRECISION=precision, BY_PAIR=by_pair,
        num_warps=down_tiles.num_warps, num_stages=down_tiles.num_stages,
    )
    return y.view(t, k, hidden).sum(dim=1).to(x.dtype) if reduce else y.view(t, k, hidden)
