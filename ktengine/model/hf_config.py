"""Reading Hugging Face config.json dicts in both spellings.

Published checkpoints say `num_experts`, `rope_theta`, `torch_dtype`; configs written by
transformers 5 say `num_local_experts`, `rope_parameters: {rope_theta, rope_type, ...}`, `dtype`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ktengine.config import RopeConfig, parse_dtype
from ktengine.errors import ConfigError, ModelLoadError

_SUPPORTED_ROPE = {"default", "linear", "llama3", "yarn"}


def read_json_object(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file that must hold an object; ModelLoadError otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def require(hf: dict[str, Any], *names: str) -> Any:
    """The first of `names` present in the config; a clear error if none is."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    raise ConfigError(f"config.json lacks {' / '.join(names)}")


def optional(hf: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return default


def num_experts(hf: dict[str, Any]) -> int:
    return int(require(hf, "num_experts", "num_local_experts"))


def dtype(hf: dict[str, Any]):
    return parse_dtype(optional(hf, "dtype", "torch_dtype", default="bfloat16"))


def eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def rope(hf: dict[str, Any]) -> RopeConfig:
    """Rope settings from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in _SUPPORTED_ROPE:
        raise ConfigError(
            f"unsupported rope_type {rope_type!r} (supported: {', '.join(sorted(_SUPPORTED_ROPE))})"
        )
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0) or 1.0),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast", 32.0) or 32.0),
        beta_slow=float(params.get("beta_slow", 1.0) or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        partial_rotary_factor=float(partial),
    )


def sliding_window(hf: dict[str, Any], default_types: list[str] | None = None,
                   use_by_default: bool = True) -> int | None:
    """The sliding window every attention layer uses, or None for none: `sliding_window`
    when `use_sliding_window` (absent: use_by_default) and the layer types (config.json's,
    else default_types) window any layer. Per-layer windows (`layer_types` mixing sliding
    and full attention) are refused: one window serves all."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", use_by_default) else None
    types = hf.get("layer_types") or default_types
    if types is not None and window:
        sliding = {t == "sliding_attention" for t in types if t in ("sliding_attention", "full_attention")}
        if sliding == {True, False}:
            raise ConfigError("layer_types mixes sliding-window and full attention layers; "
                              "ktengine applies one sliding window to every layer or none")
        if sliding == {False}:
            return None
    return int(window) if window else None


def sparse_layers(hf: dict[str, Any], num_layers: int, experts: int) -> tuple[bool, ...]:
    """Qwen-style placement of MoE layers: decoder_sparse_step and mlp_only_layers."""
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    dense = set(hf.get("mlp_only_layers") or [])
    return tuple(
        i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(num_layers)
    )


def attention_shape(hf: dict[str, Any]) -> dict[str, int]:
    hidden = int(require(hf, "hidden_size"))
    heads = int(require(hf, "num_attention_heads"))
    return {
        "hidden_size": hidden,
        "num_heads": heads,
        "num_kv_heads": int(optional(hf, "num_key_value_heads", default=heads)),
        "head_dim": int(optional(hf, "head_dim", default=hidden // heads)),
    }


def common(hf: dict[str, Any]) -> dict[str, Any]:
    """Fields every supported decoder shares, as ModelConfig keyword arguments."""
    return {
        "architecture": hf["architectures"][0],
        "vocab_size": int(require(hf, "vocab_size")),
        "num_layers": int(require(hf, "num_hidden_layers")),
        **attention_shape(hf),
        "num_experts": num_experts(hf),
        "top_k": int(require(hf, "num_experts_per_tok")),
        "hidden_act": hf.get("hidden_act", "silu"),
        "rms_norm_eps": float(optional(hf, "rms_norm_eps", default=1e-6)),
        "rope": rope(hf),
        "max_position_embeddings": int(optional(hf, "max_position_embeddings", default=4096)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "clip_qkv": hf.get("clip_qkv"),
        "dtype": dtype(hf),
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_ids": eos_ids(hf),
    }


def qwen_moe_shape(hf: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Qwen-family MLP sizes: dense layers by decoder_sparse_step / mlp_only_layers."""
    return {
        "intermediate_size": int(hf.get("intermediate_size") or 0),
        "moe_intermediate_size": int(require(hf, "moe_intermediate_size")),
        "moe_layers": sparse_layers(hf, base["num_layers"], base["num_experts"]),
    }


def all_moe_shape(hf: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Mixtral-style MLP sizes: every layer MoE, experts sized by `intermediate_size`."""
    return {
        "intermediate_size": 0,
        "moe_intermediate_size": int(require(hf, "intermediate_size")),
        "moe_layers": (True,) * base["num_layers"],
    }
