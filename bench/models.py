"""Random-weight MoE checkpoints with realistic shapes, written quickly for benchmarks.

The vocabulary is the demo tokenizer's (so outputs decode); everything else follows the
preset. `num_layers` trims a preset to fewer layers when memory or time is short.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

PRESETS = {
    # a mid-size model that fits a small machine: 8 MoE layers × 64 experts, top-8
    "medium": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4, head_dim=64, num_experts=64, num_experts_per_tok=8,
                   moe_intermediate_size=512, intermediate_size=2048),
    # Qwen3-30B-A3B
    "qwen3-30b-a3b": dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144),
}


def write_random_checkpoint(path: Path, preset: str, num_layers: int | None = None, seed: int = 0) -> Path:
    from ktengine.model.demo import ensure_demo_model

    shape = dict(PRESETS[preset])
    if num_layers:
        shape["num_hidden_layers"] = num_layers
    demo = ensure_demo_model()
    vocab = json.loads((demo / "config.json").read_text())["vocab_size"]
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": vocab,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 8192,
        "torch_dtype": "bfloat16", "norm_topk_prob": True, "tie_word_embeddings": False,
        "hidden_act": "silu", **shape,
    }
    path.mkdir(parents=True, exist_ok=True)
    if (path / "config.json").exists() and json.loads((path / "config.json").read_text()) == config:
        return path
    g = torch.Generator().manual_seed(seed)
    h, hd, i_moe = shape["hidden_size"], shape["head_dim"], shape["moe_intermediate_size"]
    q, kv, e = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd, shape["num_experts"]

    def rnd(*s):
        return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rnd(vocab, h), "lm_head.weight": rnd(vocab, h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors.update({
            p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
            p + "self_attn.q_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
            p + "self_attn.k_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "mlp.gate.weight": rnd(e, h),
            # fused expert stacks (transformers 5 layout) keep the file count low
            p + "mlp.experts.gate_up_proj": rnd(e, 2 * i_moe, h),
            p + "mlp.experts.down_proj": rnd(e, h, i_moe),
        })
    save_file(tensors, str(path / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (demo / name).exists():
            shutil.copy(demo / name, path / name)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
