"""OLMoE: q/k RMSNorm over the whole projection, optional clip_qkv, every layer MoE."""
from ktengine.config import ModelConfig, QKNorm
from ktengine.model import hf_config
from ktengine.model.registry import ArchSpec


def config_from_hf(hf: dict) -> ModelConfig:
    base = hf_config.common(hf)
    return ModelConfig(
        **base,
        **hf_config.all_moe_shape(hf, base),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        o_proj_bias=bool(hf.get("attention_bias", False)),
        qk_norm=QKNorm.FULL,
    )


SPEC = ArchSpec(name="OlmoeForCausalLM", config_from_hf=config_from_hf)
