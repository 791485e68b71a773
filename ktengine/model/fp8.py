"""FP8 block-quantized checkpoints (the DeepSeek-V3 / Qwen "-FP8" format).

config.json carries `quantization_config: {"quant_method": "fp8", "weight_block_size": [128, 128],
"activation_scheme": "dynamic", ...}`. A quantized weight W [..., out, in] is stored as
float8_e4m3fn next to its inverse scales `<name>_scale_inv` [..., ceil(out/bo), ceil(in/bi)]
(fp32), one per bo × bi block: W ≈ fp8 · scale_inv. So `x.weight` pairs with
`x.weight_scale_inv`, and a fused expert stack `experts.gate_up_proj` with
`experts.gate_up_proj_scale_inv`. Tensors without a scale (embeddings, norms, routers) are
stored in the checkpoint's dtype as usual.

Fp8Reader.read dequantizes a weight once, as it is read, into the compute dtype (the config's
dtype, bf16 for published checkpoints), so the rest of the loader, and the packing of CPU
experts into their formats, see an ordinary checkpoint. The exception is the weights named in
`keep_fp8`: on a GPU with fp8 matrix products the loader hands those, raw, with their scales,
to fp8_linear.Fp8Linear layers (dense layers only: attention, dense MLPs, shared experts;
routed experts are always dequantized). See loader.load_model for which layers qualify.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ktengine.errors import ConfigError, ModelLoadError

SCALE_SUFFIX = "_scale_inv"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FP8_DTYPES = {torch.float8_e4m3fn, torch.float8_e5m2}


@dataclass(frozen=True)
class Fp8Config:
    block_size: tuple[int, int]  # (rows, columns) of one scale block of a weight [out, in]


def fp8_config_from_hf(hf: dict[str, Any]) -> Fp8Config | None:
    """The checkpoint's fp8 settings; None without a quantization_config; ConfigError if bad."""
    quant = hf.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise ConfigError("config.json quantization_config must be an object")
    method = quant.get("quant_method")
    if method != "fp8":
        raise ConfigError(
            f"unsupported quant_method {method!r} in quantization_config (supported: fp8)"
        )
    block = quant.get("weight_block_size")
    if not (
        isinstance(block, list | tuple)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ConfigError(
            f"quantization_config weight_block_size must be two positive integers, got {block!r}"
        )
    scheme = quant.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ConfigError(f"unsupported fp8 activation_scheme {scheme!r} (supported: dynamic)")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"unsupported fp8 fmt {fmt!r} (supported: e4m3)")
    return Fp8Config(block_size=(block[0], block[1]))


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the inverse scales of a weight of `shape` [..., out, in]."""
    *lead, out, inp = shape
    return (*lead, -(-out // block[0]), -(-inp // block[1]))


def quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise fp8 quantization of [..., out, in]: (float8_e4m3fn weight, fp32 scale_inv)."""
    *lead, out, inp = weight.shape
    bo, bi = block
    nbo, nbi = -(-out // bo), -(-inp // bi)
    w = weight.float()
    padded = torch.zeros(*lead, nbo * bo, nbi * bi, dtype=torch.float32, device=w.device)
    padded[..., :out, :inp] = w
    blocks = padded.view(*lead, nbo, bo, nbi, bi)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / FP8_MAX  # [..., nbo, nbi]
    q = (blocks / scale[..., :, None, :, None]).view(*lead, nbo * bo, nbi * bi)[..., :out, :inp]
    return q.to(torch.float8_e4m3fn).contiguous(), scale


def dequantize(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """fp8 [..., out, in] × per-block scale_inv [..., ceil(out/bo), ceil(in/bi)] → dtype."""
    out, inp = weight.shape[-2:]
    scale = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :out, :]
    scale = scale.repeat_interleave(block[1], dim=-1)[..., :inp]
    return (weight.float() * scale).to(dtype)


class Fp8Reader:
    """Reads checkpoint tensors by name: fp8 weights come out dequantized, scales are consumed,
    except for the weights in `keep_fp8`, which come out as stored, their scales read apart.

    `tensors` maps every tensor name of the checkpoint to a function that reads it.
    """

    def __init__(
        self,
        config: Fp8Config | None,
        tensors: dict[str, Callable[[], torch.Tensor]],
        dtype: torch.dtype,
        keep_fp8: frozenset[str] = frozenset(),
    ) -> None:
        self.config, self.tensors, self.dtype = config, tensors, dtype
        self.keep_fp8 = keep_fp8
        scales = [n for n in tensors if n.endswith(SCALE_SUFFIX)]
        for name in scales:
            if name[: -len(SCALE_SUFFIX)] not in tensors:
                raise ModelLoadError(
                    f"checkpoint tensor {name} has no weight {name[: -len(SCALE_SUFFIX)]}"
                )
        if scales and config is None:
            raise ModelLoadError(
                f"checkpoint has fp8 scales (e.g. {scales[0]}) but config.json has no "
                "quantization_config"
            )

    @staticmethod
    def is_scale(name: str) -> bool:
        return name.endswith(SCALE_SUFFIX)

    def is_consumed(self, name: str) -> bool:
        """A scale that dequantization uses up; the scale of a kept weight is a tensor to load."""
        return self.is_scale(name) and name[: -len(SCALE_SUFFIX)] not in self.keep_fp8

    def read(self, name: str) -> torch.Tensor:
        tensor = self.tensors[name]()
        scale_name = name + SCALE_SUFFIX
        is_fp8 = tensor.dtype in _FP8_DTYPES
        if scale_name not in self.tensors:
            if is_fp8:
                raise ModelLoadError(
                    f"checkpoint tensor {name} is {str(tensor.dtype).replace('torch.', '')} "
                    f"but has no {scale_name}"
                )
            return tensor
        if not is_fp8:
            raise ModelLoadError(
                f"checkpoint tensor {name} has a {scale_name} but is {tensor.dtype}, not fp8"
            )
        scale = self.tensors[scale_name]()
        block = self.config.block_size
        expected = scale_shape(tuple(tensor.shape), block)
        if tuple(scale.shape) != expected:
            raise ModelLoadError(
                f"{scale_name} has shape {tuple(scale.shape)}, expected {expected} for "
                f"{tuple(tensor.shape)} in {block[0]}x{block[1]} blocks"
            )
        if name in self.keep_fp8:
            return tensor
        return dequantize(tensor, scale, self.config.block_size, self.dtype)
