"""Tiny random Hugging Face checkpoints of every supported architecture, built with transformers.

`make_checkpoint(tmp, arch, dtype, fused=False)` writes config.json, safetensors weights (the
per-expert names published checkpoints use, or the fused expert stacks of transformers 5)
and a ChatML tokenizer, and returns the directory. `make_fp8_checkpoint(src, tmp, block)`
quantizes one to fp8 blocks, beside a plain checkpoint of the dequantized weights;
`FP8_SHAPES[arch]` are overrides that make every attention and dense-MLP weight a multiple of
128 in both dimensions, so that a GPU keeps them in fp8 (build those with init_std=FP8_STD).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizer_builders import write_chatml_dir

from ktengine.model.fp8 import dequantize, quantize

VOCAB = 600  # the test tokenizer's vocabulary

ARCHS = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM")

_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def hf_config(arch: str, **overrides):
    import transformers

    if arch == "Qwen3MoeForCausalLM":
        cfg = transformers.Qwen3MoeConfig(
            **_COMMON, head_dim=16, num_experts=8, moe_intermediate_size=32, intermediate_size=96,
            norm_topk_prob=True, mlp_only_layers=[0], rope_theta=1e6,
        )
    elif arch == "Qwen2MoeForCausalLM":
        cfg = transformers.Qwen2MoeConfig(
            **_COMMON, num_experts=8, moe_intermediate_size=32, intermediate_size=96,
            shared_expert_intermediate_size=48, decoder_sparse_step=1, norm_topk_prob=False,
        )
    elif arch == "MixtralForCausalLM":
        cfg = transformers.MixtralConfig(**_COMMON, num_local_experts=8, intermediate_size=32)
    elif arch == "Qwen3NextForCausalLM":  # layers: linear, full, linear, full
        cfg = transformers.Qwen3NextConfig(
            **{**_COMMON, "num_hidden_layers": 4}, head_dim=16, num_experts=8,
            moe_intermediate_size=32, shared_expert_intermediate_size=48, intermediate_size=96,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=8, linear_conv_kernel_dim=4, full_attention_interval=2,
            norm_topk_prob=True, mlp_only_layers=[2], rope_parameters={
                "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
        )
    elif arch == "OlmoeForCausalLM":
        cfg = transformers.OlmoeConfig(**_COMMON, num_experts=8, intermediate_size=32, clip_qkv=8.0)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def make_checkpoint(
    path: Path, arch: str, dtype: torch.dtype = torch.float32, fused: bool = False, seed: int = 0,
    init_std: float = 0.08, **overrides,
) -> Path:
    import transformers

    torch.manual_seed(seed)
    config = hf_config(arch, **overrides)
    model = getattr(transformers, arch)(config)
    with torch.no_grad():  # larger than the default init so routing and logits are not flat
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, init_std)
            elif arch == "Qwen3NextForCausalLM" and name.endswith("norm.weight"):
                # zero-centred (1 + w) norms start at 0, the gated norm at 1: move both off it
                param.normal_(1.0 if "linear_attn.norm" in name else 0.0, 0.1)
    model = model.to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if fused:  # rewrite the weights with transformers' in-memory (fused experts) names
        for f in path.glob("*.safetensors*"):
            f.unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    write_chatml_dir(path, vocab_size=VOCAB)
    return path


FP8_QUANT = {
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
}

# hidden 256; q/k/v/o, dense MLPs and shared experts multiples of 128. Routed experts keep
# their small sizes (they are dequantized anyway), and so do Qwen3-Next's linear-attention
# projections but one (in_proj_qkvz: 128 wide): layers of other shapes are dequantized.
FP8_STD = 0.02  # hidden 256 with the default 0.08 amplifies every rounding layer after layer
FP8_SHAPES = {
    "Qwen3MoeForCausalLM": {"hidden_size": 256, "head_dim": 128, "num_attention_heads": 2,
                            "num_key_value_heads": 1, "intermediate_size": 384},
    "Qwen2MoeForCausalLM": {"hidden_size": 256, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "shared_expert_intermediate_size": 128},
    "Qwen3NextForCausalLM": {"hidden_size": 256, "head_dim": 64, "intermediate_size": 128,
                             "shared_expert_intermediate_size": 128},
}


def _quantizable(name: str, tensor: torch.Tensor) -> bool:
    """Linear weights and fused expert stacks; not embeddings, lm_head, routers or gates."""
    if tensor.dim() == 3:
        return name.endswith(("experts.gate_up_proj", "experts.down_proj"))
    skip = ("embed_tokens", "lm_head", ".gate.weight", "shared_expert_gate")
    return tensor.dim() == 2 and name.endswith(".weight") and not any(s in name for s in skip)


def make_fp8_checkpoint(src: Path, tmp: Path, block: tuple[int, int]) -> tuple[Path, Path]:
    """src quantized to fp8 blocks (tmp/fp8), and a plain checkpoint of its dequantized
    weights (tmp/ref)."""
    fp8_dir, ref_dir = tmp / "fp8", tmp / "ref"
    shutil.copytree(src, fp8_dir)
    shutil.copytree(src, ref_dir)
    weights = load_file(str(src / "model.safetensors"))
    quantized, reference = {}, {}
    for name, tensor in weights.items():
        if _quantizable(name, tensor):
            q, scale = quantize(tensor, block)
            quantized[name], quantized[name + "_scale_inv"] = q, scale
            tensor = dequantize(q, scale, block, tensor.dtype)
        else:
            quantized[name] = tensor
        reference[name] = tensor
    save_file(quantized, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(reference, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {**FP8_QUANT, "weight_block_size": list(block)}
    (fp8_dir / "config.json").write_text(json.dumps(config))
    return fp8_dir, ref_dir
