"""Small building blocks shared by every architecture: norms, activations, dense MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ktengine.errors import ConfigError

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation(name: str):
    if name not in _ACTIVATIONS:
        raise ConfigError(f"unsupported hidden_act {name!r} (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def empty_param(*shape: int, dtype: torch.dtype) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class RMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32, the weight applied after casting back (as transformers does)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = empty_param(size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x * rsqrt(mean(x²) + eps)
        return self.weight * xf.to(dtype)


class Linear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_param(out_features, in_features, dtype=dtype)
        self.bias = empty_param(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class GatedMLP(torch.nn.Module):
    """down(act(gate x) * up x): the dense MLP and the shared expert."""

    def __init__(self, hidden: int, intermediate: int, act: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, False, dtype)
        self.up_proj = Linear(hidden, intermediate, False, dtype)
        self.down_proj = Linear(intermediate, hidden, False, dtype)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
