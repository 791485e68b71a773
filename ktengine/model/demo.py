"""The built-in demo model: a small random-weight Qwen3-MoE checkpoint, made on first use.

With no --model, ktengine runs this. It is built deterministically (same bytes every time) in a
few seconds and cached under env.cache_dir(), so the first run needs no download. The weights
are random, so its text is nonsense, but its MoE layers are real (32 experts, top-4), so every
placement and CPU/GPU expert feature can be exercised on it.

The directory is a Hugging Face checkpoint in the published spelling (num_experts, rope_theta,
torch_dtype; per-expert tensor names), loadable by transformers as well.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from ktengine import env
from ktengine.model.demo_corpus import demo_corpus

DEMO_VERSION = "1"  # bump when the recipe changes: it names the cache directory

_VOCAB_SIZE = 4096
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "model.safetensors")

_CHAT_TEMPLATE = """\
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('the demo model knows the roles system, user and assistant, not '
                            + message['role']) }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

_SHAPE: dict[str, Any] = {
    "hidden_size": 256, "num_hidden_layers": 6, "intermediate_size": 512, "mlp_only_layers": [0],
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 32,
    "num_experts_per_tok": 4, "moe_intermediate_size": 128, "decoder_sparse_step": 1,
}


def demo_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the demo checkpoint lives: <cache_dir>/demo-moe-v<DEMO_VERSION>."""
    return Path(cache_dir or env.cache_dir()) / f"demo-moe-v{DEMO_VERSION}"


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the demo checkpoint's directory, building it first if it is not there.

    Built in a temporary directory next to the target and renamed into place, so a reader never
    sees a half-written checkpoint and two processes racing to build it both end up fine.
    """
    target = demo_model_dir(cache_dir)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not _is_complete(target):
        # Damaged by hand (a renamed-in build is always complete): start over.
        shutil.rmtree(target, ignore_errors=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}-building-", dir=target.parent))
    try:
        build_demo_model(build_dir)
        os.rename(build_dir, target)
    except OSError:
        if not _is_complete(target):  # not another process winning the race: a real error
            raise
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return target


def build_demo_model(path: Path) -> None:
    """Write the demo checkpoint's files into the existing directory `path`."""
    tokenizer = _train_tokenizer()
    tokenizer.save(str(path / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in _SPECIAL_TOKENS}
    config = _config(tokenizer.get_vocab_size(with_added_tokens=True), ids)
    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    })
    _write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "chat_template": _CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "model_max_length": 4096,
    })
    save_file(_weights(config), str(path / "model.safetensors"), metadata={"format": "pt"})


def _train_tokenizer() -> Tokenizer:
    # Byte-level BPE like Qwen's (any text round-trips; digits split one by one).
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB_SIZE, special_tokens=list(_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(demo_corpus(), trainer)
    return tokenizer


def _config(vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        **_SHAPE, "vocab_size": vocab_size,
        "hidden_act": "silu", "norm_topk_prob": True, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": None, "max_position_embeddings": 4096,
        "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": _SHAPE["num_hidden_layers"],
        "tie_word_embeddings": False, "initializer_range": 0.02, "output_router_logits": False,
        "router_aux_loss_coef": 0.001, "use_cache": True, "torch_dtype": "bfloat16",
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
    }


def _weight_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, in a fixed order (the order random numbers are drawn)."""
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"],
                                                                        hidden)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_dim),
            p + "self_attn.q_norm.weight": (head_dim,),
            p + "self_attn.k_norm.weight": (head_dim,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
        if layer in config["mlp_only_layers"]:
            mlps, inter = [p + "mlp."], config["intermediate_size"]
        else:
            shapes[p + "mlp.gate.weight"] = (config["num_experts"], hidden)
            mlps = [f"{p}mlp.experts.{e}." for e in range(config["num_experts"])]
            inter = config["moe_intermediate_size"]
        for mlp in mlps:
            shapes.update({mlp + "gate_proj.weight": (inter, hidden),
                           mlp + "up_proj.weight": (inter, hidden),
                           mlp + "down_proj.weight": (hidden, inter)})
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def _weights(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in _weight_shapes(config).items():
        if len(shape) == 1:  # norm weights
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    return tensors


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _FILES)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
