"""Architecture registry: how each supported checkpoint maps onto the one MoE decoder.

Each architecture file defines an ArchSpec: how to read its config.json, and how its
checkpoint names the routed-expert tensors.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ktengine.errors import ConfigError

if TYPE_CHECKING:
    from ktengine.config import ModelConfig


@dataclass(frozen=True)
class ArchSpec:
    name: str
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    moe_prefix: str = "mlp"  # module holding router and experts: mlp | block_sparse_moe
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    model_class: Callable[[ModelConfig], Any] | None = None  # None: decoder.MoEForCausalLM


def _specs() -> dict[str, ArchSpec]:
    from ktengine.model import mixtral, olmoe, qwen2_moe, qwen3_moe, qwen3_next

    specs = (qwen3_moe.SPEC, qwen2_moe.SPEC, mixtral.SPEC, olmoe.SPEC, qwen3_next.SPEC)
    return {s.name: s for s in specs}


def supported_architectures() -> list[str]:
    return sorted(_specs())


def spec_for(hf: dict[str, Any]) -> ArchSpec:
    archs = hf.get("architectures") or []
    if not archs:
        raise ConfigError("config.json has no 'architectures' entry")
    specs = _specs()
    if archs[0] not in specs:
        raise ConfigError(
            f"unsupported architecture {archs[0]!r} (supported: {', '.join(sorted(specs))})"
        )
    return specs[archs[0]]
