"""A graph step's hand-off to the CPU experts and back, as two kernels per MoE layer.

With stream memory operations a layer costs the stream three copy-engine copies into pinned
memory, a flag write, a flag wait, a flag reset, a copy back and an add: on an H200 about
35 us per layer even when the CPU had nothing to do (bench/decode_step.py --trace), as the
stream switched between engines and memory operations. Here:

  hand_off  copies x, topk_ids and topk_weights into pinned memory through its device
            addresses, then writes done = 0 and ready = 1 there (the dispatcher's flags,
            dispatch.h); one thread of the last of its programs to finish writes the flags,
            after every program's copies are visible to the CPU (system-scope fences, a
            device counter)
  collect   returns the GPU experts' output (or its k unreduced rows per token, summed
            here: one kernel fewer; loaded before the wait) plus, once done == 1, the CPU
            experts' output read straight from pinned memory; one thread of each program polls the flag, with a
            pause between reads, and a barrier holds the others (every thread polling had
            each program keep several reads of the flag's line in flight over PCIe while the
            CPU worked)

Both are ordinary kernels, so the stream never leaves the compute engine. The dispatcher
(ktengine_ext/csrc/dispatch.c) is the same as for stream memory operations: it waits for
ready, clears it, runs the layer and writes done. Done is cleared by the next hand-off of the
layer, before its ready, so collect never needs to write.

CUDA only: the interpreter has no inline PTX (the copies and the sum have references in
tests/test_handoff_kernels.py, run on a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # 16-bit words (hand_off) or elements (collect) per program


@triton.jit
def _fence_sys(dep):
    """Every memory access of this thread before it is visible system-wide before any after."""
    return tl.inline_asm_elementwise("fence.sc.sys;\n\tmov.b32 $0, $1;", "=r,r", [dep],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _signal_sys(done, ready, dep):
    """Thread 0 of the program alone: done = 0, a release fence, ready = 1. One store per
    flag: with one per warp, a late ready = 1 could land after the dispatcher had cleared it,
    and its next run would take the layer as handed over."""
    return tl.inline_asm_elementwise(
        "{\n\t.reg .pred %pz;\n\t.reg .b32 %tz;\n\tmov.u32 %tz, %tid.x;\n\t"
        "setp.eq.u32 %pz, %tz, 0;\n\t"
        "@%pz st.relaxed.sys.global.b32 [$1], 0;\n\t"
        "@%pz fence.acq_rel.sys;\n\t"
        "@%pz st.relaxed.sys.global.b32 [$2], 1;\n\t"
        "mov.b32 $0, $3;\n\t}",
        "=r,l,l,r", [done, ready, dep], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _wait_sys(flag):
    """Thread 0 of the program alone: polls until *flag == 1 (system-scope acquire loads, a
    short sleep between them). The caller's barrier then holds the other threads, so what
    they load afterwards follows the CPU's release (acquire, then the barrier)."""
    return tl.inline_asm_elementwise(
        "{\n\t.reg .pred %pw;\n\t.reg .b32 %tw, %fw;\n\t"
        "mov.u32 %tw, %tid.x;\n\tsetp.ne.u32 %pw, %tw, 0;\n\t@%pw bra WAITED;\n"
        "POLL:\n\tld.acquire.sys.global.b32 %fw, [$1];\n\t"
        "setp.eq.u32 %pw, %fw, 1;\n\t@%pw bra WAITED;\n\t"
        "nanosleep.u32 100;\n\tbra POLL;\n"
        "WAITED:\n\tmov.b32 $0, %tw;\n\t}",
        "=r,l", [flag], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _hand_off_kernel(a_src, a_dst, na, b_src, b_dst, nb, c_src, c_dst, nc, ready, done, counter,
                     BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < na
    tl.store(a_dst + offs, tl.load(a_src + offs, mask=ok), mask=ok)
    ok = offs < nb
    tl.store(b_dst + offs, tl.load(b_src + offs, mask=ok), mask=ok)
    ok = offs < nc
    tl.store(c_dst + offs, tl.load(c_src + offs, mask=ok), mask=ok)
    _fence_sys(tl.program_id(0))
    tl.debug_barrier()  # every thread's copies are out before this program counts itself
    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")  # after the fence: not pure
    if arrived == tl.num_programs(0) - 1:  # the last program: every copy is out
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
        _signal_sys(done, ready, arrived)


@triton.jit
def _collect_kernel(gpu_out, host_out, out, n, hidden, done, K: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    # the GPU's rows first (written by earlier kernels of this stream): their loads and sum
    # overlap the wait instead of following it
    if K == 1:
        a = tl.load(gpu_out + offs, mask=ok).to(tl.float32)
    else:  # [T, K, H] rows: summed in order, in fp32
        row = (offs // hidden) * (K * hidden) + offs % hidden
        a = tl.load(gpu_out + row, mask=ok)
        for j in tl.static_range(1, K):
            a += tl.load(gpu_out + row + j * hidden, mask=ok)
    _wait_sys(done)
    tl.debug_barrier()  # nobody reads the CPU's output before thread 0 saw done == 1
    b = tl.load(host_out + offs, mask=ok, cache_modifier=".cv").to(tl.float32)
    tl.store(out + offs, (a + b).to(out.dtype.element_ty), mask=ok)


def _words(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.int16)


def hand_off(srcs: tuple[torch.Tensor, ...], dsts: tuple[torch.Tensor, ...], ready: torch.Tensor,
             done: torch.Tensor, counter: torch.Tensor) -> None:
    """dsts[i].copy_(srcs[i]) for three same-dtype, same-size pairs (dsts: mapped pinned
    memory), then done = 0 and ready = 1 (int32 [1] each, mapped pinned memory) once the
    copies are visible to the CPU. counter: int32 [1] on the device, zero between calls."""
    assert len(srcs) == len(dsts) == 3
    args = []
    for s, d in zip(srcs, dsts, strict=True):
        assert s.dtype == d.dtype and s.numel() == d.numel() and d.is_contiguous(), (s.shape, d.shape)
        d = d.view(-1).view(torch.int16)
        args += [_words(s), d, d.numel()]
    longest = max(args[2], args[5], args[8])
    _hand_off_kernel[(triton.cdiv(longest, BLOCK),)](*args, ready, done, counter, BLOCK=BLOCK)


def collect(gpu_out: torch.Tensor, host_out: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
    """gpu_out + host_out (mapped pinned memory, [T, H]) once done == 1, in host_out's dtype.
    gpu_out: [T, H] in that dtype, or float32 [T, k, H] (per-pair rows, summed here first)."""
    assert host_out.is_contiguous() and host_out.dim() == 2
    t, hidden = host_out.shape
    if gpu_out.dim() == 3:
        assert gpu_out.shape[::2] == host_out.shape and gpu_out.dtype == torch.float32
        k = gpu_out.shape[1]
    else:
        assert gpu_out.shape == host_out.shape and gpu_out.dtype == host_out.dtype
        k = 1
    gpu_out = gpu_out.contiguous()
    out = torch.empty(t, hidden, dtype=host_out.dtype, device=gpu_out.device)
    n = out.numel()
    _collect_kernel[(triton.cdiv(n, BLOCK),)](gpu_out, host_out, out, n, hidden, done, K=k, BLOCK=BLOCK)
    return out
