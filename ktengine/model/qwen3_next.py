"""Qwen3-Next: a hybrid stack of Gated DeltaNet and gated full-attention layers over an MoE.

Layer i mixes tokens with linear attention (gated_deltanet.py, a per-request recurrent state)
or with full attention (paged KV cache), as config `layer_types` says (default: every
`full_attention_interval`-th layer is full attention). Full attention here has an output gate
(q_proj yields a query and a sigmoid gate per head), per-head q/k RMSNorm, and rotary on the
first `partial_rotary_factor` of each head. Every RMSNorm outside the linear layers scales by
`1 + w` (zero-centred weights). The MLP is MoEBlock: routed experts plus a shared expert with a
sigmoid gate. Multi-token-prediction weights (`mtp.*`) are skipped by the loader.

`kv_caches` holds one entry per hidden layer: (k, v) for attention layers, (conv state,
delta-rule state) for linear ones (state_cache.layer_caches builds it).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ktengine.config import LayerType, LinearAttentionConfig, ModelConfig, QKNorm
from ktengine.errors import ConfigError
from ktengine.model import hf_config
from ktengine.model.attention import AttentionMetadata, paged_attention
from ktengine.model.decoder import MoEBlock, MoEForCausalLM
from ktengine.model.gated_deltanet import GatedDeltaNet
from ktengine.model.layers import GatedMLP, Linear, empty_param
from ktengine.model.registry import ArchSpec
from ktengine.model.rope import RotaryEmbedding


def _layer_types(hf: dict, num_layers: int) -> tuple[LayerType, ...]:
    names = hf.get("layer_types")
    if names is None:
        interval = int(hf.get("full_attention_interval") or 4)
        names = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(num_layers)
        ]
    if len(names) != num_layers:
        raise ConfigError(f"layer_types has {len(names)} entries for {num_layers} layers")
    valid = {t.value for t in LayerType}
    bad = [n for n in names if n not in valid]
    if bad:
        raise ConfigError(
            f"unsupported layer type {bad[0]!r} (supported: {', '.join(sorted(valid))})"
        )
    return tuple(LayerType(n) for n in names)


def config_from_hf(hf: dict) -> ModelConfig:
    base = hf_config.common(hf)
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    if "partial_rotary_factor" not in params and "partial_rotary_factor" not in hf:
        base["rope"] = replace(base["rope"], partial_rotary_factor=0.25)  # transformers' default
    linear = LinearAttentionConfig(
        num_key_heads=int(hf_config.require(hf, "linear_num_key_heads")),
        num_value_heads=int(hf_config.require(hf, "linear_num_value_heads")),
        key_head_dim=int(hf_config.require(hf, "linear_key_head_dim")),
        value_head_dim=int(hf_config.require(hf, "linear_value_head_dim")),
        conv_kernel_size=int(hf_config.optional(hf, "linear_conv_kernel_dim", default=4)),
    )
    if linear.num_value_heads % linear.num_key_heads:
        raise ConfigError("linear_num_value_heads must be a multiple of linear_num_key_heads")
    return ModelConfig(
        **base,
        **hf_config.qwen_moe_shape(hf, base),
        shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
        shared_expert_gate=True,
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        attention_bias=bool(hf.get("attention_bias", False)),
        qk_norm=QKNorm.PER_HEAD,
        layer_types=_layer_types(hf, base["num_layers"]),
        linear_attention=linear,
    )


class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm scaled by (1 + w), all in fp32, cast back at the end (as transformers does)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = empty_param(size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class GatedAttention(torch.nn.Module):
    """Full attention whose output is scaled by sigmoid(gate) before o_proj."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        c, dt = config, config.dtype
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.q_proj = Linear(c.hidden_size, 2 * q_size, c.attention_bias, dt)  # query and gate
        self.k_proj = Linear(c.hidden_size, kv_size, c.attention_bias, dt)
        self.v_proj = Linear(c.hidden_size, kv_size, c.attention_bias, dt)
        self.o_proj = Linear(q_size, c.hidden_size, c.attention_bias, dt)
        self.q_norm = ZeroCenteredRMSNorm(c.head_dim, c.rms_norm_eps, dt)
        self.k_norm = ZeroCenteredRMSNorm(c.head_dim, c.rms_norm_eps, dt)
        self.scale = c.head_dim**-0.5

    def forward(self, x, cos_sin, meta: AttentionMetadata, kv) -> torch.Tensor:
        n = x.shape[0]
        q, gate = self.q_proj(x).view(n, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q)  # [N, heads, D]
        k = self.k_norm(self.k_proj(x).view(n, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        cos, sin = cos_sin
        q, k = RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin)
        out = paged_attention(q, k, v, meta, kv, self.scale).view(n, -1)
        return self.o_proj(out * torch.sigmoid(gate.reshape(n, -1)))


class DecoderLayer(torch.nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, moe_index: int | None) -> None:
        super().__init__()
        self.is_linear = config.layer_type(layer_id) is LayerType.LINEAR_ATTENTION
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config, layer_id)
        else:
            self.self_attn = GatedAttention(config, layer_id)
        self.input_layernorm = ZeroCenteredRMSNorm(
            config.hidden_size, config.rms_norm_eps, config.dtype
        )
        self.post_attention_layernorm = ZeroCenteredRMSNorm(
            config.hidden_size, config.rms_norm_eps, config.dtype
        )
        if moe_index is None:
            self.mlp = GatedMLP(
                config.hidden_size, config.intermediate_size, config.hidden_act, config.dtype
            )
        else:
            self.mlp = MoEBlock(config, moe_index)

    def forward(self, x, cos_sin, meta, cache) -> torch.Tensor:
        h = self.input_layernorm(x)
        h = (
            self.linear_attn(h, meta, cache)
            if self.is_linear
            else self.self_attn(h, cos_sin, meta, cache)
        )
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3NextForCausalLM(MoEForCausalLM):
    """MoEForCausalLM over this file's layers; meta.state carries the linear layers' slots."""

    layer_cls = DecoderLayer
    norm_cls = ZeroCenteredRMSNorm


SPEC = ArchSpec(
    name="Qwen3NextForCausalLM", config_from_hf=config_from_hf, model_class=Qwen3NextForCausalLM
)
