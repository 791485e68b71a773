"""The built-in demo model: its files, determinism, caching, and loading in transformers."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import transformers
from safetensors import safe_open

from ktengine.model import demo
from ktengine.model.tokenizer import ChatTemplateError, Tokenizer


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo.ensure_demo_model(tmp_path_factory.mktemp("cache"))


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_config_has_the_published_spelling(demo_dir):
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["model_type"] == "qwen3_moe" and config["torch_dtype"] == "bfloat16"
    assert config["num_experts"] == 32 and config["num_experts_per_tok"] == 4
    assert config["rope_theta"] == 1e6 and config["mlp_only_layers"] == [0]
    assert config["tie_word_embeddings"] is False and config["norm_topk_prob"] is True
    assert config["vocab_size"] == Tokenizer.from_dir(demo_dir).vocab_size
    assert 4096 <= config["vocab_size"] <= 8192
    assert demo_dir.name == f"demo-moe-v{demo.DEMO_VERSION}"


def test_tensors_are_bf16_with_per_expert_names(demo_dir):
    with safe_open(demo_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert all(f.get_slice(n).get_dtype() == "BF16" for n in names)
        assert f.get_slice("model.layers.3.mlp.experts.31.down_proj.weight").get_shape() == [256,
                                                                                           128]
        assert f.get_slice("model.layers.0.mlp.gate_proj.weight").get_shape() == [512, 256]
        assert f.get_slice("model.layers.1.self_attn.k_proj.weight").get_shape() == [64, 256]
        norm = f.get_tensor("model.layers.2.self_attn.q_norm.weight")
        assert norm.shape == (32,) and bool((norm == 1).all())
    assert "model.layers.1.mlp.gate.weight" in names and "lm_head.weight" in names
    assert not any(n.startswith("model.layers.0.mlp.experts") for n in names)
    num_expert_tensors = sum(".experts." in n for n in names)
    assert num_expert_tensors == 5 * 32 * 3


def test_build_is_deterministic_across_processes(demo_dir, tmp_path):
    # A fresh process: hash seeds and thread scheduling differ, the bytes must not.
    code = "import sys, pathlib; from ktengine.model import demo; " \
           "demo.build_demo_model(pathlib.Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert _sha256(tmp_path / name) == _sha256(demo_dir / name), name


def test_cache_dir_from_env_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("KTENGINE_CACHE_DIR", str(tmp_path))
    path = demo.ensure_demo_model()
    assert path == tmp_path / f"demo-moe-v{demo.DEMO_VERSION}" == demo.demo_model_dir()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert demo.ensure_demo_model() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    (path / "model.safetensors").unlink()  # an incomplete directory is rebuilt
    assert (demo.ensure_demo_model() / "model.safetensors").is_file()


def test_concurrent_builds_end_with_one_complete_dir(tmp_path):
    with ThreadPoolExecutor(3) as pool:
        results = set(pool.map(lambda _: demo.ensure_demo_model(tmp_path), range(3)))
    assert len(results) == 1
    assert [p.name for p in tmp_path.iterdir()] == [results.pop().name]  # no leftover build dirs


def test_chat_template_and_special_tokens(demo_dir):
    tok = Tokenizer.from_dir(demo_dir)
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi!"}]
    assert tok.apply_chat_template(chat) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n")
    im_end, endoftext = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert tok.eos_token_ids == {im_end, endoftext}
    assert tok.bos_token_id is None and tok.pad_token_id == endoftext
    ids = tok.encode_chat(chat)
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids.count(im_end) == 2
    with pytest.raises(ChatTemplateError, match="tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    text = "The 12 harbour boats 🙂 sailed."
    assert tok.decode(tok.encode(text)) == text


def test_loads_and_generates_in_transformers(demo_dir):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        demo_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.bfloat16
    ref_tok = transformers.AutoTokenizer.from_pretrained(demo_dir)
    tok = Tokenizer.from_dir(demo_dir)
    chat = [{"role": "user", "content": "Hello, how are you?"}]
    assert ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(chat)
    ids = tok.encode_chat(chat)
    assert ids == list(ref_tok.apply_chat_template(chat, add_generation_prompt=True,
                                                   return_dict=False))
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert out[0, :len(ids)].tolist() == ids and len(ids) < out.shape[1] <= len(ids) + 8
    logits = model(torch.tensor([ids])).logits.float()
    assert torch.isfinite(logits).all() and logits.shape == (1, len(ids), tok.vocab_size)
