"""FP8 block-quantized checkpoints: every architecture against transformers on the dequantized
weights, the block arithmetic itself, and clear errors for malformed quantization configs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from checkpoints import ARCHS, make_checkpoint
from engine_utils import prefill_logits
from safetensors.torch import load_file, save_file

from ktengine.errors import ConfigError, ModelLoadError
from ktengine.model.fp8 import dequantize, quantize
from ktengine.model.loader import load_model, load_model_config

ALL_ARCHS = (*ARCHS, "Qwen3NextForCausalLM")
QUANT = {
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
}


def _quantizable(name: str, tensor: torch.Tensor) -> bool:
    """Linear weights and fused expert stacks; not embeddings, lm_head, routers or gates."""
    if tensor.dim() == 3:
        return name.endswith(("experts.gate_up_proj", "experts.down_proj"))
    skip = ("embed_tokens", "lm_head", ".gate.weight", "shared_expert_gate")
    return tensor.dim() == 2 and name.endswith(".weight") and not any(s in name for s in skip)


def _fp8_and_reference(src, tmp_path, block):
    """Writes src quantized to fp8 blocks, and a plain checkpoint of the dequantized weights."""
    fp8_dir, ref_dir = tmp_path / "fp8", tmp_path / "ref"
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
    config["quantization_config"] = {**QUANT, "weight_block_size": list(block)}
    (fp8_dir / "config.json").write_text(json.dumps(config))
    return fp8_dir, ref_dir


def _logits(path, dtype, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(tmp_path, arch):
    # 32x32 blocks on 48/64/96-wide weights: several blocks per weight, partial ones at the edge
    src = make_checkpoint(tmp_path / "src", arch, dtype=torch.float32)
    fp8_dir, ref_dir = _fp8_and_reference(src, tmp_path, (32, 32))
    config = load_model_config(fp8_dir)
    model = load_model(fp8_dir, config, torch.device("cpu"), progress=False)
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(2))
    got = prefill_logits(model, ids.tolist())
    ref = _logits(ref_dir, torch.float32, ids)
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 1e-4 * scale
    # fp8 moved the logits by its rounding of every weight (3 mantissa bits), amplified a
    # little by these random 3-4-layer models, never more
    drift = (got - _logits(src, torch.float32, ids)).abs()
    assert 1e-3 * scale < drift.mean().item() <= 0.1 * scale


@pytest.mark.parametrize(
    ("arch", "dtype"),
    [
        ("Qwen3MoeForCausalLM", torch.bfloat16),
        ("Qwen3NextForCausalLM", torch.float32),
    ],
)
def test_fused_fp8_checkpoint_with_128_blocks(tmp_path, arch, dtype):
    src = make_checkpoint(tmp_path / "src", arch, dtype=dtype, fused=True)
    fp8_dir, ref_dir = _fp8_and_reference(src, tmp_path, (128, 128))
    weights = load_file(str(fp8_dir / "model.safetensors"))
    assert weights["model.layers.1.mlp.experts.gate_up_proj"].dtype == torch.float8_e4m3fn
    assert weights["model.layers.1.mlp.experts.gate_up_proj_scale_inv"].shape == (8, 1, 1)
    config = load_model_config(fp8_dir)
    assert config.dtype == dtype
    model = load_model(fp8_dir, config, torch.device("cpu"), progress=False)
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(3))
    got = prefill_logits(model, ids.tolist())
    ref = _logits(ref_dir, dtype, ids)
    err, scale = (got - ref).abs(), ref.abs().max().item()
    if dtype == torch.float32:
        assert err.max().item() <= 1e-4 * scale
    else:  # bf16 roundings through 3 layers
        assert err.max().item() <= 0.1 * scale and err.mean().item() <= 0.01 * scale


def test_block_quantization_arithmetic():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    q, scale = quantize(w, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 2)
    back = dequantize(q, scale, (128, 128), torch.float32)
    for i in range(3):
        for j in range(2):
            blk = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
            assert torch.equal(back[blk], q[blk].float() * scale[i, j])
            amax = w[blk].abs().max()
            assert scale[i, j] == pytest.approx(amax / 448.0)
            assert (back[blk] - w[blk]).abs().max() <= amax / 16  # 3 mantissa bits
    assert dequantize(q, scale, (128, 128), torch.bfloat16).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8")
    src = make_checkpoint(tmp / "src", "Qwen3MoeForCausalLM")
    return _fp8_and_reference(src, tmp, (32, 32))[0]


def _load(path):
    return load_model(path, load_model_config(path), torch.device("cpu"), progress=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quant_method": "awq"}, "unsupported quant_method 'awq'"),
        (
            {"weight_block_size": [128]},
            r"weight_block_size must be two positive integers, got \[128\]",
        ),
        ({"weight_block_size": [0, 128]}, "weight_block_size must be two positive integers"),
        ({"weight_block_size": None}, "weight_block_size must be two positive integers, got None"),
        ({"activation_scheme": "static"}, "activation_scheme 'static'"),
    ],
)
def test_malformed_quantization_config_is_a_clear_error(tmp_path, fp8_ckpt, change, message):
    path = tmp_path / "ck"
    shutil.copytree(fp8_ckpt, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(change)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        _load(path)


def test_fp8_tensors_without_scales_or_config_are_clear_errors(tmp_path, fp8_ckpt):
    weights = load_file(str(fp8_ckpt / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"

    def broken(tensors, config_change=None):
        path = tmp_path / f"ck{len(list(tmp_path.iterdir()))}"
        shutil.copytree(fp8_ckpt, path)
        save_file(tensors, str(path / "model.safetensors"))
        if config_change is not None:
            config = json.loads((path / "config.json").read_text())
            config_change(config)
            (path / "config.json").write_text(json.dumps(config))
        return path

    no_scale = {k: v for k, v in weights.items() if k != name + "_scale_inv"}
    with pytest.raises(
        ModelLoadError, match=f"{name} is float8_e4m3fn but has no {name}_scale_inv"
    ):
        _load(broken(no_scale))
    no_weight = {k: v for k, v in weights.items() if k != name}
    with pytest.raises(ModelLoadError, match=f"{name}_scale_inv has no weight {name}"):
        _load(broken(no_weight))
    bad_shape = {**weights, name + "_scale_inv": torch.ones(1, 1)}
    with pytest.raises(ModelLoadError, match=r"_scale_inv has shape \(1, 1\), expected \(2, 2\)"):
        _load(broken(bad_shape))
    with pytest.raises(ModelLoadError, match="no quantization_config"):
        _load(broken(weights, lambda c: c.pop("quantization_config")))
