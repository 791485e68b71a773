"""Mixtral: every layer MoE, top-k weights always renormalised, experts named w1/w3/w2."""
from ktengine.config import ModelConfig
from ktengine.model import hf_config
from ktengine.model.registry import ArchSpec


def config_from_hf(hf: dict) -> ModelConfig:
    base = hf_config.common(hf)
    return ModelConfig(
        **base,
        **hf_config.all_moe_shape(hf, base),
        norm_topk_prob=True,
        sliding_window=hf_config.sliding_window(hf),
    )


SPEC = ArchSpec(
    name="MixtralForCausalLM",
    config_from_hf=config_from_hf,
    moe_prefix="block_sparse_moe",
    expert_names=("w1", "w3", "w2"),
)
