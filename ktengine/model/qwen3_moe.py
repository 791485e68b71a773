"""Qwen3-MoE: per-head q/k RMSNorm, no biases, softmax-then-top-k routing."""
from ktengine.config import ModelConfig, QKNorm
from ktengine.model import hf_config
from ktengine.model.registry import ArchSpec


def config_from_hf(hf: dict) -> ModelConfig:
    base = hf_config.common(hf)
    return ModelConfig(
        **base,
        **hf_config.qwen_moe_shape(hf, base),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        o_proj_bias=bool(hf.get("attention_bias", False)),
        qk_norm=QKNorm.PER_HEAD,
        sliding_window=hf_config.sliding_window(hf, use_by_default=False),
    )


SPEC = ArchSpec(name="Qwen3MoeForCausalLM", config_from_hf=config_from_hf)
