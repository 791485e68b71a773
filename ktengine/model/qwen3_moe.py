"""Qwen3-MoE: per-head q/k RMSNorm, no biases, softmax-then-top-k routing."""
from ktengine.config import ModelConfig, QKNorm
from ktengine.model import hf_config
from ktengine.model.registry import ArchSpec


def config_from_hf(hf: dict) -> ModelConfig:
    base = hf_config.common(hf)
    return ModelConfig(
        **base,
        intermediate_size=int(hf.get("intermediate_size") or 0),
        moe_intermediate_size=int(hf_config.require(hf, "moe_intermediate_size")),
        moe_layers=hf_config.sparse_layers(hf, base["num_layers"], base["num_experts"]),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        qk_norm=QKNorm.PER_HEAD,
        sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window") else None,
    )


SPEC = ArchSpec(name="Qwen3MoeForCausalLM", config_from_hf=config_from_hf)
