"""The one MoE decoder every supported architecture maps onto.

embed → [RMSNorm → attention → residual → RMSNorm → (dense MLP | MoE) → residual] × L
→ RMSNorm → lm_head, over a flat array of the step's new tokens.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ktengine.config import ModelConfig
from ktengine.model.attention import Attention, AttentionMetadata
from ktengine.model.layers import GatedMLP, Linear, RMSNorm, activation, empty_param
from ktengine.model.rope import RotaryEmbedding
from ktengine.moe.gpu_experts import torch_experts_forward
from ktengine.moe.router import fused_topk, route


class RoutedExperts(torch.nn.Module):
    """The stacked routed-expert weights of one MoE layer and the hook that computes them.

    `compute` is replaced by the hybrid executor once placement is known; by default every
    expert runs with torch on the weights' device.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e, h, i, dt = config.num_experts, config.hidden_size, config.moe_intermediate_size, config.dtype
        self.gate_proj = empty_param(e, i, h, dtype=dt)
        self.up_proj = empty_param(e, i, h, dtype=dt)
        self.down_proj = empty_param(e, h, i, dtype=dt)
        self.act = activation(config.hidden_act)
        self.compute = None  # set by the hybrid executor: (x, topk_ids, topk_weights) -> out

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if self.compute is not None:
            return self.compute(x, topk_ids, topk_weights)
        return torch_experts_forward(
            x, self.gate_proj, self.up_proj, self.down_proj, topk_ids, topk_weights, self.act
        )


class MoEBlock(torch.nn.Module):
    def __init__(self, config: ModelConfig, moe_index: int) -> None:
        super().__init__()
        self.moe_index = moe_index  # index among MoE layers (the placement mask's row)
        self.top_k, self.norm_topk_prob = config.top_k, config.norm_topk_prob
        self.fused_topk = fused_topk(self.top_k)  # one kernel after the router's product on CUDA, or None
        self.gate = Linear(config.hidden_size, config.num_experts, False, config.dtype)
        self.experts = RoutedExperts(config)
        self.shared_expert = None
        self.shared_expert_gate = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(
                config.hidden_size, config.shared_expert_intermediate_size, config.hidden_act, config.dtype
            )
            if config.shared_expert_gate:
                self.shared_expert_gate = Linear(config.hidden_size, 1, False, config.dtype)
        self.observer = None  # callable(moe_index, topk_ids): the distribution recorder
        self.all_reduce = None  # tensor parallel: sums the ranks' partial outputs (parallel/)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_ids, topk_weights = route(x, self.gate.weight, self.top_k, self.norm_topk_prob,
                                       self.fused_topk)
        return self.combine(x, topk_ids, topk_weights)

    def combine(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The layer's output once routed: routed experts (+ shared expert)."""
        if self.observer is not None:
            self.observer(self.moe_index, topk_ids)
        out = self.experts(x, topk_ids, topk_weights)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        if self.all_reduce is not None:  # routed and shared experts joined in one all-reduce
            out = self.all_reduce(out)
        return out


class DecoderLayer(torch.nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, moe_index: int | None) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_id)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
        if moe_index is None:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.dtype)
        else:
            self.mlp = MoEBlock(config, moe_index)

    def forward(self, x, cos_sin, meta, kv) -> torch.Tensor:
        if meta.decode is not None and meta.decode.compiled and isinstance(self.mlp, MoEBlock):
            x, h, topk_ids, topk_weights = compiled_attend_route()(self, x, cos_sin, meta, kv)
            return x + self.mlp.combine(h, topk_ids, topk_weights)
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, meta, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


def attend_route(layer: DecoderLayer, x, cos_sin, meta, kv):
    """A MoE layer up to its experts: attention and residual, the post-attention norm, routing."""
    x = x + layer.self_attn(layer.input_layernorm(x), cos_sin, meta, kv)
    h = layer.post_attention_layernorm(x)
    moe = layer.mlp
    return (x, h, *route(h, moe.gate.weight, moe.top_k, moe.norm_topk_prob, moe.fused_topk))


@functools.cache
def compiled_attend_route():
    """attend_route through torch.compile: its elementwise chains fused into a few kernels. One
    compiled graph serves every layer (modules are traced as inputs, not constants); fixed-
    shape decode steps call it first in their warm-up, so it compiles before any capture."""
    return torch.compile(attend_route, dynamic=True, fullgraph=True)


class Backbone(torch.nn.Module):
    def __init__(self, config: ModelConfig, layer_cls: type = DecoderLayer, norm_cls: type = RMSNorm) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(config.vocab_size, config.hidden_size, dtype=config.dtype)
        self.embed_tokens.weight.requires_grad_(False)
        moe_ids = {layer: n for n, layer in enumerate(config.moe_layer_ids)}
        self.layers = torch.nn.ModuleList(
            layer_cls(config, i, moe_ids.get(i)) for i in range(config.num_layers)
        )
        self.norm = norm_cls(config.hidden_size, config.rms_norm_eps, config.dtype)


class MoEForCausalLM(torch.nn.Module):
    """The causal LM around the backbone; an architecture with other layers or final norm
    (Qwen3-Next) subclasses it and names them in `layer_cls` / `norm_cls`."""

    layer_cls: type = DecoderLayer
    norm_cls: type = RMSNorm

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config, self.layer_cls, self.norm_cls)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, config.dtype)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoEBlock)]

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [N]
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (K/V, or linear state)
        logits_rows: torch.Tensor | None = None,  # [M] rows whose logits are wanted (None: all)
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.rotary.cos_sin(meta.positions, x.dtype)
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, cos_sin, meta, cache)
        if logits_rows is not None:
            x = x[logits_rows]
        return F.linear(self.model.norm(x), self.lm_head.weight).float()  # [M, vocab]
