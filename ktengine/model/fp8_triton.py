"""Block-scaled fp8 GEMM in Triton: the fp8 backend for GPUs where torch has none (sm_89+).

out [M, N] = (q · s) @ (W · scale_inv).t(), with q float8_e4m3fn [M, K] and s fp32 [M, K/128]
(activations, one scale per row and 128 columns) and W float8_e4m3fn [N, K] with scale_inv
fp32 [N/128, K/128] (one scale per 128 × 128 block). Each program owns a BLOCK_M × BLOCK_N
tile of the output and walks K one 128-wide scale group at a time: the fp8 dot of that group
(fp32 accumulation on the tensor cores) is scaled by the row's activation scale and the column
block's weight scale and added to the tile's fp32 accumulator. K and N must be multiples of 128
(`fp8_linear.fits_fp8`); M is any size (rows past M are masked).

Imported only where triton is installed; `TRITON_INTERPRET=1` runs it on the CPU for tests,
against `fp8_linear.w8a8_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GROUP = 128  # K per scale group = BLOCK_K


@triton.jit
def _w8a8_block_kernel(
    q_ptr, s_ptr, w_ptr, ws_ptr, out_ptr,
    M, N, K,
    stride_qm, stride_sm, stride_wn, stride_wsn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    ks = tl.arange(0, GROUP_K)  # [BK]
    row_ok = rows < M
    q_ptrs = q_ptr + rows[:, None] * stride_qm + ks[None, :]  # [BM, BK]
    w_ptrs = w_ptr + cols[None, :] * stride_wn + ks[:, None]  # [BK, BN]: W read transposed
    s_ptrs = s_ptr + rows * stride_sm  # [BM], one group further each step
    ws_ptrs = ws_ptr + (cols // GROUP_K) * stride_wsn  # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(K // GROUP_K):
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        w = tl.load(w_ptrs)
        s = tl.load(s_ptrs + g, mask=row_ok, other=0.0)
        ws = tl.load(ws_ptrs + g)
        acc += tl.dot(q, w) * s[:, None] * ws[None, :]
        q_ptrs += GROUP_K
        w_ptrs += GROUP_K
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def w8a8_block_matmul(
    q: torch.Tensor,  # [M, K] float8_e4m3fn
    s: torch.Tensor,  # [M, K/128] fp32
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    scale_inv: torch.Tensor,  # [N/128, K/128] fp32
    out_dtype: torch.dtype,
) -> torch.Tensor:
    m, k = q.shape
    n = weight.shape[0]
    assert k % GROUP == 0 and n % GROUP == 0 and weight.shape[1] == k, (q.shape, weight.shape)
    q, weight = q.contiguous(), weight.contiguous()
    s, scale_inv = s.contiguous(), scale_inv.contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=q.device)
    if m == 0:
        return out
    # decode-sized batches: narrow tiles so that enough programs cover the SMs
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 64 else 128
    grid = (triton.cdiv(m, block_m), n // block_n)
    _w8a8_block_kernel[grid](
        q, s, weight, scale_inv, out, m, n, k,
        q.stride(0), s.stride(0), weight.stride(0), scale_inv.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, GROUP_K=GROUP,
    )
    return out
