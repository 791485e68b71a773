"""Random-weight MoE checkpoints with realistic shapes and a realistic routing profile.

Random routers route almost uniformly; real models do not. RoutingProfile builds skew and
locality into the weights:
  - every token embedding is  √H · (√(1−α−β)·n_t + √α·c + √β·d_g(t))  with n_t random, c a
    direction all tokens share and d_g the direction of the token's group g(t) (the vocabulary
    is cut into `groups` contiguous ranges);
  - router row e of each layer gets  skew·log p_e · c/√(Hα)  (p: Zipf(zipf_s) over a random
    permutation of the experts, per layer: a few hot experts take a large share) plus
    locality · d_g/√(Hβ) for the experts group g prefers (a random `1/groups` of them);
  - attention and expert output projections are small (std `out_std`), so the embedding
    dominates the residual stream and the profile survives every layer.
A prompt drawn from one group's token range therefore favours that group's experts
(per-prompt locality) on top of the global skew. `bench/workload.py` draws such prompts.
The vocabulary is the demo tokenizer's (so outputs decode).
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

PRESETS = {
    # a mid-size model that fits a small machine: 8 MoE layers × 64 experts, top-8
    "medium": {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16,
                   "num_key_value_heads": 4, "head_dim": 64, "num_experts": 64, "num_experts_per_tok": 8,
                   "moe_intermediate_size": 512, "intermediate_size": 2048},
    # Qwen3-30B-A3B
    "qwen3-30b-a3b": {"hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
                          "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                          "num_experts_per_tok": 8, "moe_intermediate_size": 768, "intermediate_size": 6144},
    # a 512-expert top-10 MoE like Qwen3-Next-80B-A3B's MoE (full attention, one shared expert)
    "next-512": {"hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 16,
                     "num_key_value_heads": 2, "head_dim": 256, "num_experts": 512, "num_experts_per_tok": 10,
                     "moe_intermediate_size": 512, "intermediate_size": 5120,
                     "shared_expert_intermediate_size": 512},
}


@dataclass(frozen=True)
class RoutingProfile:
    zipf_s: float = 1.0  # popularity of the rank-r expert ∝ 1 / (r + 1)^s
    skew: float = 1.0  # weight of the global popularity in the router logits
    groups: int = 8  # token groups (contiguous vocabulary ranges)
    locality: float = 2.0  # logit bonus of a group's preferred experts
    alpha: float = 0.2  # share of the embedding along the shared direction
    beta: float = 0.3  # share along the token group's direction
    out_std: float = 0.004  # std of o_proj and expert down_proj weights

    def describe(self) -> dict:
        return asdict(self)


UNIFORM = RoutingProfile(skew=0.0, locality=0.0, alpha=0.0, beta=0.0, out_std=0.02)


def token_group(token: int, vocab: int, groups: int) -> int:
    return token * groups // vocab


def write_random_checkpoint(path: Path, preset: str, num_layers: int | None = None,
                            profile: RoutingProfile = RoutingProfile(), seed: int = 0) -> Path:
    """Writes (once; reused when config and profile match) a random checkpoint to `path`."""
    from ktengine.model.demo import ensure_demo_model

    shape = dict(PRESETS[preset])
    if num_layers:
        shape["num_hidden_layers"] = num_layers
    demo = ensure_demo_model()
    vocab = json.loads((demo / "config.json").read_text())["vocab_size"]
    arch = "Qwen2MoeForCausalLM" if "shared_expert_intermediate_size" in shape else "Qwen3MoeForCausalLM"
    config = {
        "architectures": [arch], "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "max_position_embeddings": 8192, "torch_dtype": "bfloat16", "norm_topk_prob": True,
        "tie_word_embeddings": False, "hidden_act": "silu", "qkv_bias": False,
        "routing_profile": profile.describe(), **shape,
        "experts_drawn_on": "cuda" if torch.cuda.is_available() else "cpu",
        **({"model_seed": seed} if seed else {}),
    }
    path.mkdir(parents=True, exist_ok=True)
    if (path / "config.json").exists() and json.loads((path / "config.json").read_text()) == config:
        return path
    g = torch.Generator().manual_seed(seed)
    h, hd, i_moe = shape["hidden_size"], shape["head_dim"], shape["moe_intermediate_size"]
    q, kv, e = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd, shape["num_experts"]
    layers, groups = shape["num_hidden_layers"], profile.groups

    def rnd(*s, std=0.02):
        return (torch.randn(*s, generator=g) * std).to(torch.bfloat16)

    # the expert stacks are nearly all the bytes: drawn on the GPU when there is one (a
    # minute less for 8 Qwen3-30B-A3B layers; other values than a CPU-only machine draws)
    g_experts = torch.Generator(device="cuda").manual_seed(seed) if torch.cuda.is_available() else g

    def rnd_experts(*s, std=0.02):
        if g_experts is g:
            return rnd(*s, std=std)
        return (torch.randn(*s, generator=g_experts, device="cuda") * std).to(torch.bfloat16).cpu()

    def unit(*s):
        v = torch.randn(*s, generator=g)
        return v / v.norm(dim=-1, keepdim=True)

    shared, group_dirs = unit(h), unit(groups, h)
    noise = unit(vocab, h)
    a, b = profile.alpha, profile.beta
    token_groups = torch.tensor([token_group(t, vocab, groups) for t in range(vocab)])
    embed = math.sqrt(h) * (math.sqrt(1 - a - b) * noise + math.sqrt(a) * shared
                            + math.sqrt(b) * group_dirs[token_groups])
    def ones(n: int = h) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    for old in path.glob("*.safetensors"):  # another shape's files
        old.unlink()
    # one file per layer, written as it is drawn: a 48-layer Qwen3-30B-A3B (~60 GB) never
    # sits in memory whole
    save_file({"model.embed_tokens.weight": embed.to(torch.bfloat16), "lm_head.weight": rnd(vocab, h),
               "model.norm.weight": ones()}, str(path / "model-head.safetensors"))
    ranks = torch.arange(e, dtype=torch.float64)
    log_pop = (-profile.zipf_s * torch.log(ranks + 1)).float()
    for layer in range(layers):
        p = f"model.layers.{layer}."
        tensors = {}
        router = torch.randn(e, h, generator=g) * 0.02
        if a > 0:
            popularity = log_pop[torch.randperm(e, generator=g)]
            router += profile.skew * popularity[:, None] * shared[None] / math.sqrt(h * a)
        if b > 0:
            for group in range(groups):
                liked = torch.randperm(e, generator=g)[: max(1, e // groups)]
                router[liked] += profile.locality * group_dirs[group] / math.sqrt(h * b)
        tensors.update({
            p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h),
            p + "self_attn.o_proj.weight": rnd(h, q, std=profile.out_std),
            p + "input_layernorm.weight": ones(), p + "post_attention_layernorm.weight": ones(),
            p + "mlp.gate.weight": router.to(torch.bfloat16),
            # fused expert stacks (transformers 5 layout) keep the file count low
            p + "mlp.experts.gate_up_proj": rnd_experts(e, 2 * i_moe, h),
            p + "mlp.experts.down_proj": rnd_experts(e, h, i_moe, std=profile.out_std),
        })
        if arch == "Qwen3MoeForCausalLM":
            tensors[p + "self_attn.q_norm.weight"] = ones(hd)
            tensors[p + "self_attn.k_norm.weight"] = ones(hd)
        else:
            s_i = shape["shared_expert_intermediate_size"]
            tensors.update({
                p + "mlp.shared_expert.gate_proj.weight": rnd(s_i, h),
                p + "mlp.shared_expert.up_proj.weight": rnd(s_i, h),
                p + "mlp.shared_expert.down_proj.weight": rnd(h, s_i, std=profile.out_std),
                p + "mlp.shared_expert_gate.weight": rnd(1, h),
            })
        save_file(tensors, str(path / f"model-layer{layer:03d}.safetensors"))
        del tensors
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (demo / name).exists():
            shutil.copy(demo / name, path / name)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
