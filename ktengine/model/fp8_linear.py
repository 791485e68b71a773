"""Linear layers that keep fp8 block-quantized weights and multiply in fp8 (CUDA only).

The weight stays as the checkpoint stores it: W [out, in] float8_e4m3fn and its inverse
scales [out/128, in/128] (fp32), one per 128 × 128 block. Activations are quantized as they
arrive, per token and per 128-column group (the checkpoints' "dynamic" scheme): x ≈ q · s with
q fp8 [N, in] and s fp32 [N, in/128]. A backend then computes, accumulating in fp32,

    y[n, o] = Σ_g s[n, g] · scale_inv[o // 128, g] · Σ_{k in group g} q[n, k] · W[o, k]

  SCALED_MM     torch's `F.scaled_mm` (torch ≥ 2.10) with the (BlockWise1x128,
                BlockWise128x128) recipe: cuBLASLt ≥ 12.9, sm_90 (Hopper) only
  SCALED_MM_V1  the same GEMM through `torch._scaled_mm` (torch 2.9), which tells the scheme
                from the scales' shapes
  TRITON        a small Triton kernel (fp8_triton.py) for fp8-capable GPUs (sm_89 and newer)
                where torch has no block-scaled product

`fp8_backend(device)` picks one once, at load, by running each candidate on a small product
with several scale blocks and comparing it with `w8a8_reference`; a backend that raises or
disagrees is passed over, and None means the loader dequantizes as on the CPU. A layer keeps
its fp8 weight only when `fits_fp8(out, in, block)`: 128 × 128 blocks and both dimensions
multiples of 128 (whole scale blocks, and cuBLAS's multiples of 16); other layers, such as
those of the tiny test models, are dequantized at load.
"""

from __future__ import annotations

import enum
import logging

import torch
import torch.nn.functional as F

from ktengine.model.fp8 import FP8_MAX, dequantize, quantize
from ktengine.model.layers import empty_param

log = logging.getLogger(__name__)

BLOCK = 128  # scale block of weights (128 × 128) and activations (1 × 128)


class Fp8Backend(str, enum.Enum):
    SCALED_MM = "scaled_mm"  # cuBLASLt block-scaled fp8 GEMM through F.scaled_mm (sm_90)
    SCALED_MM_V1 = "_scaled_mm"  # the same through torch._scaled_mm
    TRITON = "triton"  # fp8_triton.py (sm_89+)


def fits_fp8(out_features: int, in_features: int, block: tuple[int, int]) -> bool:
    """Whether a layer of this shape can keep its fp8 weight (see the module docstring)."""
    return tuple(block) == (BLOCK, BLOCK) and out_features % BLOCK == 0 and in_features % BLOCK == 0


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] (K a multiple of 128) → q float8_e4m3fn [N, K], s fp32 [N, K/128]; x ≈ q · s."""
    n, k = x.shape
    groups = x.float().view(n, k // BLOCK, BLOCK)
    s = groups.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX  # [N, K/128]
    q = (groups / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(n, k), s


def w8a8_reference(
    x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """What the backends compute, in fp32 with torch: quantized activations × fp8 weight."""
    q, s = quantize_activation(x)
    xq = (q.float().view(q.shape[0], -1, BLOCK) * s[..., None]).view(q.shape)
    return (xq @ dequantize(weight, scale_inv, (BLOCK, BLOCK), torch.float32).t()).to(out_dtype)


def _has_scaled_mm_v2() -> bool:
    return hasattr(F, "scaled_mm") and hasattr(getattr(F, "ScalingType", None), "BlockWise1x128")


def _weight_scale_for_scaled_mm(scale_inv: torch.Tensor, backend: Fp8Backend) -> torch.Tensor:
    """scale_inv [N/128, K/128] in the layout the scaled-mm API wants for mat_b = W.t() [K, N].

    F.scaled_mm: [L4, N/128] column-major, L4 = K/128 rounded up to 4 (cuBLAS reads the K
    blocks with a 16-byte aligned stride; the padding rows are never read as scales).
    torch._scaled_mm: the transpose [K/128, N/128] of the contiguous scales. The two agree
    when K is a multiple of 512.
    """
    if backend is Fp8Backend.SCALED_MM_V1:
        return scale_inv.t()
    n_blocks, k_blocks = scale_inv.shape
    padded = scale_inv.new_zeros(n_blocks, -(-k_blocks // 4) * 4)  # [N/128, L4] row-major
    padded[:, :k_blocks] = scale_inv
    return padded.t()


def _scaled_mm(
    x: torch.Tensor, weight: torch.Tensor, scale_b: torch.Tensor, backend: Fp8Backend
) -> torch.Tensor:
    m = x.shape[0]
    pad = -m % 4  # cuBLASLt wants the activation scales' leading dimension (M) a multiple of 4
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    q, s = quantize_activation(x)  # [M4, K], [M4, K/128]
    s = s.t().contiguous().t()  # column-major: strides (1, M4)
    if backend is Fp8Backend.SCALED_MM:
        recipe = F.ScalingType
        out = F.scaled_mm(q, weight.t(), s, recipe.BlockWise1x128, scale_b,
                          recipe.BlockWise128x128, output_dtype=x.dtype)
    else:
        out = torch._scaled_mm(q, weight.t(), s, scale_b, out_dtype=x.dtype)
    return out[:m]


def fp8_matmul(
    x: torch.Tensor,  # [N, K] in the compute dtype
    weight: torch.Tensor,  # [out, K] float8_e4m3fn
    scale_inv: torch.Tensor,  # [out/128, K/128] fp32, as stored
    scale_b: torch.Tensor | None,  # scale_inv in the scaled-mm layout (SCALED_MM* only)
    backend: Fp8Backend,
) -> torch.Tensor:
    """x @ W.t() with fp8 activations and weights on `backend`: [N, out] in x's dtype."""
    if backend is not Fp8Backend.TRITON:
        return _scaled_mm(x, weight, scale_b, backend)
    from ktengine.model.fp8_triton import w8a8_block_matmul  # needs triton

    q, s = quantize_activation(x)
    return w8a8_block_matmul(q, s, weight, scale_inv, x.dtype)


class Fp8Linear(torch.nn.Module):
    """A linear layer over an fp8 weight [out, in] with 128 × 128 block scales.

    `weight` and `weight_scale_inv` carry the checkpoint's names and shapes, so the loader
    copies them in as they are; `prepare()` (after the move to the device) derives the layout
    the backend wants. With `backend` None, forward dequantizes the weight on every call: the
    reference the fp8 backends are checked against, not a path anyone runs for speed.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
        backend: Fp8Backend | None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.weight = empty_param(out_features, in_features, dtype=torch.float8_e4m3fn)
        self.weight_scale_inv = empty_param(
            -(-out_features // BLOCK), -(-in_features // BLOCK), dtype=torch.float32
        )
        self.bias = empty_param(out_features, dtype=dtype) if bias else None
        # SCALED_MM*'s layout of weight_scale_inv (derived, so not saved; moves with the layer)
        self.register_buffer("scale_b", None, persistent=False)

    def prepare(self) -> None:
        if self.backend in (Fp8Backend.SCALED_MM, Fp8Backend.SCALED_MM_V1):
            self.scale_b = _weight_scale_for_scaled_mm(self.weight_scale_inv.data, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [N, in]
        if self.backend is None:
            w = dequantize(self.weight, self.weight_scale_inv, (BLOCK, BLOCK), x.dtype)
            out = F.linear(x2, w)
        else:
            out = fp8_matmul(x2, self.weight, self.weight_scale_inv, self.scale_b, self.backend)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        backend = self.backend.value if self.backend else "dequantized"
        return f"in={self.in_features}, out={self.out_features}, fp8 {backend}"


def _candidates(device: torch.device) -> list[Fp8Backend]:
    major, _ = torch.cuda.get_device_capability(device)
    found = []
    # cuBLAS implements the (1x128, 128x128) scheme for sm_90 only (torch refuses others)
    if major == 9 and _has_scaled_mm_v2():
        found.append(Fp8Backend.SCALED_MM)
    if major == 9 and hasattr(torch, "_scaled_mm"):
        found.append(Fp8Backend.SCALED_MM_V1)
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:
        found.append(Fp8Backend.TRITON)
    return found


def probe(backend: Fp8Backend, device: torch.device | str) -> str | None:
    """Runs `backend` on a small product; None if it matches w8a8_reference, else why not.

    Three K blocks (not a multiple of 4: the padded scale layout), two N blocks, five rows
    (padded to 8), the blocks of different magnitudes: a scale read from the wrong block or
    row shows up as an error of the order of the result.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    m, k, n = 5, 3 * BLOCK, 2 * BLOCK
    # powers of two, within 32x of one another: every block adds to the sum, none alike
    w_mag = 2.0 ** torch.tensor([[0.0, 1.0, 2.0], [-1.0, 3.0, -2.0]])  # per 128 x 128 block
    x_mag = 2.0 ** torch.randint(-2, 3, (m, 3), generator=gen).float()  # per row and group
    w = torch.randn(n, k, generator=gen) * w_mag.repeat_interleave(BLOCK, 0).repeat_interleave(
        BLOCK, 1)
    x = torch.randn(m, k, generator=gen) * x_mag.repeat_interleave(BLOCK, 1)
    weight, scale_inv = quantize(w, (BLOCK, BLOCK))
    x = x.to(device, torch.bfloat16)
    try:
        layer = Fp8Linear(k, n, False, torch.bfloat16, backend)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.weight_scale_inv.copy_(scale_inv)
        layer.to(device).prepare()
        got = layer(x).float()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a failed launch raises here, not later
    except Exception as exc:  # noqa: BLE001 (any failure means: not this backend)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    want = w8a8_reference(x.cpu(), weight, scale_inv, torch.float32).to(device)
    err = ((got - want).abs() / want.abs().amax(dim=1, keepdim=True)).max().item()
    if not err <= 2e-2:  # bf16 rounding of the output is 2^-8; a misread scale costs ~0.3+
        return f"wrong results (max error {err:.3g} of each row's largest value)"
    return None


def fp8_backend(device: torch.device) -> Fp8Backend | None:
    """The fp8 matmul backend for `device`, chosen once at load; None: dequantize instead."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name, cc = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        log.info("fp8: %s (sm_%d%d) has no fp8 matrix products", name, *cc)
        return None
    for backend in _candidates(device):
        why = probe(backend, device)
        if why is None:
            log.info("fp8 matmul backend: %s on %s (sm_%d%d)", backend.value, name, *cc)
            return backend
        log.warning("fp8 matmul backend %s unusable on %s: %s", backend.value, name, why)
    log.info("fp8: no fp8 matmul backend works on %s (sm_%d%d)", name, *cc)
    return None
