"""Placement strategies, budgets and statistics files: pure functions, no weights."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from ktengine.cli import main
from ktengine.config import ModelConfig, PlacementConfig
from ktengine.config import PlacementStrategy as S
from ktengine.errors import ConfigError
from ktengine.moe import placement

MODEL = ModelConfig.from_hf({
    "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 100, "hidden_size": 32,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "moe_intermediate_size": 16, "num_experts_per_tok": 2, "num_experts": 8,
    "intermediate_size": 64, "mlp_only_layers": [0],
})  # 3 MoE layers (hidden layers 1, 2, 3) × 8 experts


def _mask(**kw):
    return placement.gpu_expert_mask(PlacementConfig(**kw), MODEL)


def _ids(mask):
    return [row.nonzero().flatten().tolist() for row in mask]


def test_budget_per_layer_and_ratio():
    assert placement.total_budget(PlacementConfig(num_gpu_experts=3), 3, 8) == 9
    assert placement.total_budget(PlacementConfig(num_gpu_experts=3, gpu_experts_ratio=0.5), 3, 8) == 12
    assert placement.total_budget(PlacementConfig(gpu_experts_ratio=0.3), 3, 8) == 7  # int(7.2)
    assert placement.total_budget(PlacementConfig(), 3, 8) == 0
    for bad in (PlacementConfig(gpu_experts_ratio=1.5), PlacementConfig(gpu_experts_ratio=-0.1),
                PlacementConfig(num_gpu_experts=9)):
        with pytest.raises(ConfigError):
            placement.total_budget(bad, 3, 8)


def test_uniform_front_loading_random():
    assert _ids(_mask(strategy=S.UNIFORM, gpu_experts_ratio=7 / 24)) == [[0, 1, 2], [0, 1], [0, 1]]
    assert _ids(_mask(strategy=S.FRONT_LOADING, gpu_experts_ratio=10 / 24)) == [list(range(8)), [0, 1], []]
    rnd = _mask(strategy=S.RANDOM, gpu_experts_ratio=0.5)
    cells = torch.randperm(24, generator=torch.Generator().manual_seed(42))[:12]
    expected = torch.zeros(24, dtype=torch.bool)
    expected[cells] = True
    assert torch.equal(rnd.flatten(), expected) and int(rnd.sum()) == 12
    assert torch.equal(rnd, _mask(strategy=S.RANDOM, gpu_experts_ratio=0.5))


def test_frequency_ranks_across_layers_with_deterministic_ties(tmp_path):
    counts = torch.zeros(2, 4, 8, dtype=torch.int32)  # [buffer, hidden layers, experts]
    counts[0, 1, 5] = 100  # hot cell in MoE layer 0
    counts[1, 3, :] = 10  # MoE layer 2: all tied
    counts[0, 2, 7] = 50
    path = tmp_path / "stats.pt"
    torch.save({"logical_count": counts}, path)
    mask = _mask(strategy=S.FREQUENCY, gpu_experts_ratio=5 / 24, init_expert_location=str(path))
    assert _ids(mask) == [[5], [7], [0, 1, 2]]  # ties broken by lower expert id
    torch.save(counts.sum(0)[1:], tmp_path / "bare.pt")  # bare [moe layers, experts] tensor
    bare = _mask(strategy=S.FREQUENCY, gpu_experts_ratio=5 / 24, init_expert_location=str(tmp_path / "bare.pt"))
    assert torch.equal(bare, mask)


def test_frequency_without_statistics_warns_and_is_uniform(caplog):
    with caplog.at_level(logging.WARNING):
        mask = _mask(strategy=S.FREQUENCY, num_gpu_experts=2)
    assert "needs --init-expert-location" in caplog.text
    assert torch.equal(mask, _mask(strategy=S.UNIFORM, num_gpu_experts=2))


def test_bad_statistics_files_are_clear_errors(tmp_path):
    torch.save({"logical_count": torch.zeros(1, 4, 7)}, tmp_path / "experts.pt")
    torch.save({"logical_count": torch.zeros(1, 5, 8)}, tmp_path / "layers.pt")
    torch.save({"other": 1}, tmp_path / "nokey.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"logical_count": torch.full((4, 8), float("nan"))}, tmp_path / "nan.pt")
    torch.save({"logical_count": torch.ones(4, 8, dtype=torch.bool)}, tmp_path / "bool.pt")
    torch.save({"logical_count": torch.zeros(1, 4, 8)}, tmp_path / "zero.pt")
    cases = {"experts.pt": "7 experts per layer", "layers.pt": "5 layers", "nokey.pt": "no 'logical_count'",
             "junk.pt": "not a statistics file", "empty.pt": "not a statistics file",
             "nan.pt": "not all finite", "bool.pt": "not all finite", "zero.pt": "all zero",
             "missing.pt": "file not found"}
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            _mask(strategy=S.FREQUENCY, num_gpu_experts=1, init_expert_location=str(tmp_path / name))


def test_dynamic_flag_without_threshold_is_an_error():
    with pytest.raises(ConfigError, match="needs --kt-gpu-prefill-token-threshold"):
        placement.validate(PlacementConfig(dynamic_update=True))


def test_placement_command_prints_json_without_loading_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 100, "hidden_size": 32,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "moe_intermediate_size": 16, "num_experts_per_tok": 2, "num_experts": 8,
        "intermediate_size": 64, "mlp_only_layers": [0], "torch_dtype": "bfloat16"}))
    assert main(["placement", "--model", str(tmp_path), "--kt-expert-placement-strategy",
                 "front-loading", "--kt-num-gpu-experts", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"num_layers": 3, "num_experts": 8, "gpu_experts": [list(range(8)), [0], []],
                   "gpu_bytes": 9 * 3 * 32 * 16 * 2}
    assert main(["placement", "--model", str(tmp_path), "--kt-gpu-experts-ratio", "2"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err


def test_dynamic_plan_pairs_hottest_cpu_with_coldest_gpu_experts_until_the_rule_fails():
    """plan() against a plain per-expert loop of the same rule, on random counts with ties."""
    import types

    from ktengine.moe.dynamic import DynamicPlacer, _PendingLoad

    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        layers, experts = 4, 16
        mask = torch.rand(layers, experts, generator=gen) < (0.1 + 0.8 * trial / 30)
        counts = torch.randint(0, 6, (layers, experts), generator=gen).double() * 3
        placer = DynamicPlacer.__new__(DynamicPlacer)
        placer.hybrid = types.SimpleNamespace(mask=mask)
        placer.counts, placer.hysteresis, placer.horizon = counts, 0.25, 3.0
        placer.cpu_seconds_per_pair, placer.move_seconds = 1e-5, 2e-4
        placer._pending = [_PendingLoad(0, 0, e, None) for e in (~mask[0]).nonzero().flatten()[:1].tolist()]
        want = []
        for layer in range(layers):
            gpu = sorted(mask[layer].nonzero().flatten().tolist(), key=lambda e: (counts[layer, e], e))
            cpu = sorted((e for e in (~mask[layer]).nonzero().flatten().tolist()
                          if (layer, e) not in {(p.layer, p.expert) for p in placer._pending}),
                         key=lambda e: (-counts[layer, e], e))
            for e_in, e_out in zip(cpu, gpu):
                c_in, c_out = counts[layer, e_in].item(), counts[layer, e_out].item()
                if c_in <= 1.25 * c_out or (c_in - c_out) * 1e-5 * 3.0 <= 2e-4:
                    break
                want.append((layer, e_in, e_out))
        assert placer.plan() == want


def test_a_ratio_budget_is_not_floored_below_its_product():
    from ktengine.moe.placement import total_budget

    for ratio in (0.15, 0.3, 0.35, 0.6):  # ratio x 24 x 60 is a whole number each time
        assert total_budget(PlacementConfig(gpu_experts_ratio=ratio), 24, 60) == round(ratio * 1440)
