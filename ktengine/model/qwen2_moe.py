"""Qwen2-MoE: q/k/v biases, and a shared expert scaled by a sigmoid gate."""
from ktengine.config import ModelConfig
from ktengine.model import hf_config
from ktengine.model.registry import ArchSpec


def config_from_hf(hf: dict) -> ModelConfig:
    base = hf_config.common(hf)
    return ModelConfig(
        **base,
        **hf_config.qwen_moe_shape(hf, base),
        shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
        shared_expert_gate=True,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        attention_bias=bool(hf.get("qkv_bias", True)),
        sliding_window=hf_config.sliding_window(hf, _layer_types(hf), use_by_default=False),
    )


def _layer_types(hf: dict) -> list[str]:
    """transformers' default for Qwen2-MoE: a window on the even layers below
    max_window_layers (when use_sliding_window)."""
    below = int(hf.get("max_window_layers") or 0)
    return ["sliding_attention" if i % 2 == 0 and i < below else "full_attention"
            for i in range(int(hf.get("num_hidden_layers") or 0))]


SPEC = ArchSpec(name="Qwen2MoeForCausalLM", config_from_hf=config_from_hf)
