"""config.json in both spellings, rope variants, and clear errors for broken checkpoints."""
from __future__ import annotations

import json

import pytest
import torch
from checkpoints import make_checkpoint
from safetensors.torch import load_file, save_file

from ktengine.cli import main
from ktengine.config import ModelConfig
from ktengine.errors import ConfigError, ModelLoadError
from ktengine.model.loader import load_model, load_model_config
from ktengine.model.rope import inv_freq_and_scale

BASE = {
    "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 100, "hidden_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "moe_intermediate_size": 16, "num_experts_per_tok": 2, "intermediate_size": 64,
}


def test_both_spellings_give_the_same_config():
    published = {**BASE, "num_experts": 8, "rope_theta": 5e5, "torch_dtype": "bfloat16"}
    tf5 = {**BASE, "num_local_experts": 8, "dtype": "bfloat16",
           "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}
    assert ModelConfig.from_hf(published) == ModelConfig.from_hf(tf5)
    cfg = ModelConfig.from_hf(published)
    assert cfg.num_experts == 8 and cfg.rope.theta == 5e5 and cfg.dtype == torch.bfloat16


def test_sparse_step_and_mlp_only_layers():
    cfg = ModelConfig.from_hf({**BASE, "num_experts": 8, "num_hidden_layers": 6,
                               "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert cfg.moe_layers == (False, True, False, False, False, True)
    assert cfg.moe_layer_ids == [1, 5] and cfg.num_moe_layers == 2


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
     "truncate": False},
])
def test_rope_variants_match_transformers(rope):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.Qwen3MoeConfig(**{k: v for k, v in BASE.items() if k != "architectures"},
                                     num_experts=8, max_position_embeddings=32768,
                                     rope_parameters={"rope_theta": 10000.0, **rope})
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    cfg = ModelConfig.from_hf({**BASE, "num_experts": 8, "max_position_embeddings": 32768,
                               "rope_parameters": {"rope_theta": 10000.0, **rope}})
    inv, scale = inv_freq_and_scale(cfg.rope, 8, cfg.max_position_embeddings)
    assert torch.allclose(inv, ref_inv.float(), rtol=1e-6)
    assert scale == pytest.approx(ref_scale)


def test_unknown_architecture_and_rope_are_clear_errors():
    with pytest.raises(ConfigError, match="unsupported architecture 'LlamaForCausalLM'"):
        ModelConfig.from_hf({**BASE, "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ConfigError, match="rope_type 'longrope'"):
        ModelConfig.from_hf({**BASE, "num_experts": 8, "rope_scaling": {"rope_type": "longrope"}})
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        ModelConfig.from_hf({k: v for k, v in BASE.items() if k != "num_experts_per_tok"} | {"num_experts": 8})
    with pytest.raises(ConfigError, match="rope_type 'dynamic'"):  # refused when read, not later
        ModelConfig.from_hf({**BASE, "num_experts": 8, "rope_scaling": {"rope_type": "dynamic"}})
    for top_k in (0, 9):
        with pytest.raises(ConfigError, match="num_experts_per_tok must be between 1 and the 8"):
            ModelConfig.from_hf({**BASE, "num_experts": 8, "num_experts_per_tok": top_k})
    with pytest.raises(ConfigError, match="wrong kind"):
        ModelConfig.from_hf({**BASE, "num_experts": 8, "num_hidden_layers": "two"})
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_hf([BASE])


def test_sliding_windows_per_layer():
    """One window for every layer or none: Qwen2-MoE's default layer_types (a window on the
    even layers below max_window_layers) with none of them sliding is no window; a mix is refused."""
    q2 = {**BASE, "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 8,
          "shared_expert_intermediate_size": 16, "sliding_window": 8}
    assert ModelConfig.from_hf({**q2, "use_sliding_window": False}).sliding_window is None
    assert ModelConfig.from_hf({**q2, "use_sliding_window": True,
                                "max_window_layers": 0}).sliding_window is None
    with pytest.raises(ConfigError, match="mixes sliding-window and full attention"):
        ModelConfig.from_hf({**q2, "use_sliding_window": True, "max_window_layers": 2})
    both = {**BASE, "num_experts": 8, "use_sliding_window": True, "sliding_window": 8}
    assert ModelConfig.from_hf(both).sliding_window == 8
    assert ModelConfig.from_hf({**both, "layer_types": ["sliding_attention"] * 2}).sliding_window == 8
    assert ModelConfig.from_hf({**both, "layer_types": ["full_attention"] * 2}).sliding_window is None


@pytest.mark.parametrize("case", ["truncated", "header", "index", "config_list", "tokenizer",
                                  "tokenizer_config"])
def test_broken_files_are_one_line_errors(tmp_path, case, capsys):
    path = make_checkpoint(tmp_path / "ck", "Qwen3MoeForCausalLM")
    weights = path / "model.safetensors"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "header":
        weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])
    elif case == "index":
        (path / "model.safetensors.index.json").write_text("{not json")
    elif case == "config_list":
        (path / "config.json").write_text("[1, 2]")
    elif case == "tokenizer":
        (path / "tokenizer.json").write_text("{}")
    else:
        (path / "tokenizer_config.json").write_text("{oops")
    capsys.readouterr()  # what building the checkpoint printed
    assert main(["generate", "--model", str(path), "--prompt", "hi", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ktengine: error:"), err


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    path = make_checkpoint(tmp_path / "ck", "Qwen3MoeForCausalLM")
    weights = load_file(str(path / "model.safetensors"))
    config = load_model_config(path)

    broken = dict(weights)
    del broken["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(broken, str(path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"layers\.1\.mlp\.experts\.up_proj \(experts \[3\]\)"):
        load_model(path, config, torch.device("cpu"), progress=False)

    broken = dict(weights)
    broken["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(broken, str(path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"q_proj\.weight has shape \(3, 3\), expected \(64, 64\)"):
        load_model(path, config, torch.device("cpu"), progress=False)


def test_cli_reports_bad_checkpoints_in_one_line(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model directory not found" in err
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**BASE, "architectures": ["GPT2LMHeadModel"]}))
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "hi"]) == 2
    assert "unsupported architecture 'GPT2LMHeadModel'" in capsys.readouterr().err
