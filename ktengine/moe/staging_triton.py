"""One kernel that copies a graph step's CPU-expert inputs into pinned host memory.

A CUDA graph step hands each MoE layer's x, topk_ids and topk_weights to the CPU through pinned
buffers. Three copy-engine nodes per layer each cost their own launch, and the switches
between copy engine and compute stalled the stream for about 9 us apiece on an H200
(bench/decode_step.py --trace). Written by a kernel through the buffers' device addresses
(mapped pinned memory) the three copies become one compute node. The stream's flag write
that follows orders these writes before the CPU sees the flag.

Tensors are copied as 16-bit words, so any dtype of even byte size works.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # 16-bit words per program


@triton.jit
def _copy3_kernel(a_src, a_dst, na, b_src, b_dst, nb, c_src, c_dst, nc, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < na
    tl.store(a_dst + offs, tl.load(a_src + offs, mask=ok), mask=ok)
    ok = offs < nb
    tl.store(b_dst + offs, tl.load(b_src + offs, mask=ok), mask=ok)
    ok = offs < nc
    tl.store(c_dst + offs, tl.load(c_src + offs, mask=ok), mask=ok)


def _words(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.int16)


def copy3(srcs: tuple[torch.Tensor, ...], dsts: tuple[torch.Tensor, ...]) -> None:
    """dsts[i].copy_(srcs[i]) for three same-dtype, same-size pairs, in one launch; the
    destinations must be contiguous (they are written in place)."""
    assert len(srcs) == len(dsts) == 3
    pairs = []
    for s, d in zip(srcs, dsts, strict=True):
        assert s.dtype == d.dtype and s.numel() == d.numel() and d.is_contiguous(), (s.shape, d.shape)
        pairs.append((_words(s), d.view(-1).view(torch.int16)))
    longest = max(d.numel() for _, d in pairs)
    args = [x for s, d in pairs for x in (s, d, d.numel())]
    _copy3_kernel[(triton.cdiv(longest, BLOCK),)](*args, BLOCK=BLOCK)
