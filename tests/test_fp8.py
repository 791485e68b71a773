"""FP8 block-quantized checkpoints: every architecture against transformers on the dequantized
weights, the block arithmetic itself, clear errors for malformed quantization configs, and the
fp8 layers' references and loading (their GPU backends: test_gpu.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from checkpoints import ARCHS, FP8_SHAPES, FP8_STD, make_checkpoint, make_fp8_checkpoint
from engine_utils import check_fp8_logits, prefill_logits
from safetensors.torch import load_file, save_file

from ktengine.errors import ConfigError, ModelLoadError
from ktengine.model import fp8_linear, loader
from ktengine.model.fp8 import dequantize, quantize
from ktengine.model.fp8_linear import Fp8Backend, Fp8Linear, quantize_activation, w8a8_reference
from ktengine.model.layers import Linear
from ktengine.model.loader import load_model, load_model_config

ALL_ARCHS = (*ARCHS, "Qwen3NextForCausalLM")
def _logits(path, dtype, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(tmp_path, arch):
    # 32x32 blocks on 48/64/96-wide weights: several blocks per weight, partial ones at the edge
    src = make_checkpoint(tmp_path / "src", arch, dtype=torch.float32)
    fp8_dir, ref_dir = make_fp8_checkpoint(src, tmp_path, (32, 32))
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
    fp8_dir, ref_dir = make_fp8_checkpoint(src, tmp_path, (128, 128))
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
    return make_fp8_checkpoint(src, tmp, (32, 32))[0]


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


# ---- fp8 layers (model/fp8_linear.py): the torch references here; the GPU backends in
# ---- test_gpu.py, and the Triton kernel in the interpreter below


def _fp8_layer(out_features, in_features, bias, seed, backend=None):
    gen = torch.Generator().manual_seed(seed)
    q, scale = quantize(torch.randn(out_features, in_features, generator=gen) * 0.05, (128, 128))
    layer = Fp8Linear(in_features, out_features, bias, torch.bfloat16, backend)
    with torch.no_grad():
        layer.weight.copy_(q)
        layer.weight_scale_inv.copy_(scale)
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=gen))
    layer.prepare()
    return layer


def test_fp8_linear_reference_is_linear_on_dequantized_weights():
    layer = _fp8_layer(384, 256, True, 0)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale_inv.shape == (3, 2)
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    w = dequantize(layer.weight, layer.weight_scale_inv, (128, 128), torch.bfloat16)
    got = layer(x)
    assert got.shape == (2, 5, 384) and got.dtype == torch.bfloat16
    assert torch.equal(got, F.linear(x, w) + layer.bias)


def test_activation_quantizer_round_trips_within_fp8_error():
    gen = torch.Generator().manual_seed(0)
    mag = 2.0 ** torch.randint(-8, 9, (7, 3), generator=gen).float()  # per row and group
    x = (torch.randn(7, 384, generator=gen) * mag.repeat_interleave(128, 1)).bfloat16()
    x[3] = 0
    q, s = quantize_activation(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (7, 384) and s.shape == (7, 3)
    groups = x.float().view(7, 3, 128)
    amax = groups.abs().amax(-1)  # [7, 3]
    live = amax > 0
    assert torch.allclose(s[live], amax[live] / 448.0)
    assert (q.float().view(7, 3, 128).abs().amax(-1)[live] == 448.0).all()  # full range used
    back = q.float().view(7, 3, 128) * s[..., None]
    assert (back - groups).abs().le(amax[..., None] / 16).all()  # 3 mantissa bits
    assert (back[3] == 0).all()


def test_w8a8_reference_is_the_linear_within_activation_rounding():
    layer = _fp8_layer(256, 512, False, 2)
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(3))
    w = dequantize(layer.weight, layer.weight_scale_inv, (128, 128), torch.float32)
    exact = F.linear(x, w)
    got = w8a8_reference(x, layer.weight, layer.weight_scale_inv, torch.float32)
    # each activation moves by at most 1/16 of its group's largest (about 2.5% RMS of a value):
    # random signs keep the sums' error near that relative size, never near the bound
    rel = (got - exact).norm() / exact.norm()
    assert 1e-3 < rel.item() < 0.05


def test_triton_kernel_matches_the_reference_in_the_interpreter():
    pytest.importorskip("triton")
    script = """
import torch
from ktengine.model.fp8 import quantize
from ktengine.model.fp8_linear import Fp8Backend, probe, quantize_activation, w8a8_reference
from ktengine.model.fp8_triton import w8a8_block_matmul

gen = torch.Generator().manual_seed(0)
for m, k, n in [(1, 256, 128), (7, 384, 256), (70, 256, 384)]:
    w, scale = quantize(torch.randn(n, k, generator=gen), (128, 128))
    x = torch.randn(m, k, generator=gen).bfloat16()
    q, s = quantize_activation(x)
    got = w8a8_block_matmul(q, s, w, scale, torch.float32)
    want = w8a8_reference(x, w, scale, torch.float32)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, (m, k, n, err)
assert probe(Fp8Backend.TRITON, "cpu") is None
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]


FP8_ARCHS = tuple(FP8_SHAPES)


@pytest.fixture(scope="module", params=FP8_ARCHS)
def fp8_sized(request, tmp_path_factory):
    """A bf16 checkpoint whose attention and dense MLPs fit fp8 layers, quantized."""
    arch = request.param
    tmp = tmp_path_factory.mktemp(f"fp8-{arch}")
    src = make_checkpoint(tmp / "src", arch, dtype=torch.bfloat16, init_std=FP8_STD,
                          **FP8_SHAPES[arch])
    return src, make_fp8_checkpoint(src, tmp, (128, 128))[0]


def test_loader_on_cpu_dequantizes_every_layer(fp8_sized):
    model = _load(fp8_sized[1])
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())


def test_loader_keeps_fitting_layers_in_fp8_where_a_backend_exists(fp8_sized, monkeypatch):
    # the CPU stands in for a GPU: a backend is "found", and computes with the torch reference
    monkeypatch.setattr(loader, "fp8_backend", lambda device: Fp8Backend.TRITON)
    monkeypatch.setattr(fp8_linear, "fp8_matmul",
                        lambda x, w, scale, scale_b, backend: w8a8_reference(x, w, scale, x.dtype))
    src, path = fp8_sized
    config = load_model_config(path)
    model = load_model(path, config, torch.device("cpu"), progress=False)
    plain = load_model(path, config, torch.device("cpu"), progress=False, fp8_gpu=False)
    weights = load_file(str(path / "model.safetensors"))
    kept = 0
    for name in weights:
        if not name.endswith(".weight_scale_inv") or ".experts." in name:
            continue
        module_name = name.removesuffix(".weight_scale_inv")
        module, twin = model.get_submodule(module_name), plain.get_submodule(module_name)
        w = weights[module_name + ".weight"]
        assert type(twin) is Linear and twin.weight.dtype == torch.bfloat16
        if w.shape[0] % 128 or w.shape[1] % 128:  # dequantized like the rest
            assert type(module) is Linear and torch.equal(module.weight, twin.weight), name
            continue
        assert type(module) is Fp8Linear and module.backend is Fp8Backend.TRITON, name
        assert torch.equal(module.weight.view(torch.uint8), w.view(torch.uint8))
        assert torch.equal(module.weight_scale_inv, weights[name])
        kept += 1
    assert kept >= 3 * config.num_layers  # at least q, k and v... of every attention layer
    for layer in model.model.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is not None:
            assert all(type(p) is Fp8Linear for p in (attn.q_proj, attn.k_proj, attn.o_proj))
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(4))
    logits = [prefill_logits(m, ids.tolist()) for m in (model, plain, _load(src))]
    check_fp8_logits(*logits)



def test_no_fp8_gpu_option_reaches_the_engine_config():
    from ktengine.cli import build_parser, engine_config_from_args

    def parse(*args):
        return engine_config_from_args(build_parser().parse_args(["generate", "--prompt", "x",
                                                                  *args]))

    assert parse().fp8_gpu is True and parse("--no-fp8-gpu").fp8_gpu is False
