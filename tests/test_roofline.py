"""bench/roofline.py: the decode bound's arithmetic on a known configuration."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))

from roofline import StepBytes, decode_tok_s, expected_distinct, step_seconds

GB = 1e9


def test_gpu_bound_overlaps_cpu_and_gpu_experts_per_layer():
    # layer 0: the CPU read (2 GB at 100 GB/s = 20 ms) outlasts the GPU's (40 GB at 4000 = 10 ms);
    # layer 1: the GPU's (80 GB = 20 ms) outlasts the CPU's (1 GB = 10 ms); dense + KV: 4 GB = 1 ms
    b = StepBytes(dense=3 * GB, kv=1 * GB, gpu_experts=(40 * GB, 80 * GB), cpu_experts=(2 * GB, 1 * GB))
    assert step_seconds(b, dram_gbps=100, hbm_gbps=4000) == pytest.approx(0.001 + 0.020 + 0.020)
    assert decode_tok_s(4, b, 100, 4000) == pytest.approx(4 / 0.041)


def test_cpu_only_bound_reads_everything_from_dram():
    b = StepBytes(dense=3 * GB, kv=1 * GB, gpu_experts=(40 * GB, 80 * GB), cpu_experts=(2 * GB, 1 * GB))
    assert step_seconds(b, dram_gbps=100, hbm_gbps=None) == pytest.approx(127 / 100)


def test_expected_distinct_experts():
    counts = torch.tensor([[3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # 2 layers x 4 experts
    mask = torch.tensor([[True, False, False, False], [True, True, False, False]])
    gpu, cpu = expected_distinct(counts, mask, batch=1, top_k=2)
    # layer 0: q = (1.5 -> 1, 0.5, 0, 0); layer 1: q = 0.5 each
    assert gpu == pytest.approx([1.0, 1.0]) and cpu == pytest.approx([0.5, 1.0])
    gpu, cpu = expected_distinct(counts, mask, batch=2, top_k=2)
    assert gpu == pytest.approx([1.0, 1.5]) and cpu == pytest.approx([0.75, 1.5])
