"""The graph step's staging kernel (moe/staging_triton.py): in Triton's interpreter here (a
subprocess: TRITON_INTERPRET must be set before triton is imported), on CUDA with `-m gpu`."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = """
import torch
import torch.nn.functional as F
from ktengine.moe.staging_triton import copy3
from ktengine.moe.hybrid import GraphStep, HybridExperts
from ktengine.moe.gpu_experts import GpuExpertSlots

gen = torch.Generator().manual_seed(0)
for rows, hidden, k in [(1, 64, 8), (3, 2048, 2), (32, 80, 10), (5, 4, 1)]:
    x = torch.randn(rows, hidden, generator=gen).bfloat16()
    ids = torch.randint(0, 1 << 40, (rows, k), generator=gen)
    w = torch.rand(rows, k, generator=gen)
    dst = [torch.full_like(t, 7) for t in (x, ids, w)]
    copy3((x, ids, w), tuple(dst))
    assert all(torch.equal(a, b) for a, b in zip((x, ids, w), dst)), (rows, hidden, k)

# the layer's fixed-shape path with the kernel gives what three copies give
E, H, I, T, K = 8, 64, 32, 4, 2
w3 = [torch.randn(E, *s, generator=gen) * 0.1 for s in ((I, H), (I, H), (H, I))]
mask = torch.zeros(1, E, dtype=torch.bool)
mask[0, :3] = True
from ktengine.moe.cpu_experts import CpuExpertStore, CpuThreadPool
pool = CpuThreadPool(1)
store = CpuExpertStore(*w3, "fp32", pool)
slots = GpuExpertSlots(*w3, [0, 1, 2], E, torch.device("cpu"))
layer = HybridExperts(0, mask, slots, store, F.silu, torch.device("cpu"))
x = torch.randn(T, H, generator=gen)
ids = torch.randint(0, E, (T, K), generator=gen)
wts = torch.rand(T, K, generator=gen)
bufs = [torch.zeros(T, H), torch.zeros(T, K, dtype=torch.int64), torch.zeros(T, K), torch.zeros(T, H)]
live = torch.tensor([T], dtype=torch.int32)
call = store.bind(bufs[0], bufs[1], bufs[2], mask[0], bufs[3], live)
valid = torch.ones(T, dtype=torch.bool)
plain = layer._stream_ordered(x, ids, wts, GraphStep(call, *bufs, valid))
for b in bufs:
    b.zero_()
staged = layer._stream_ordered(x, ids, wts, GraphStep(call, *bufs, valid, None, tuple(bufs[:3])))
assert torch.equal(plain, staged)
assert torch.equal(bufs[1], ids)  # the kernel wrote the CPU's inputs
pool.close()
"""


def test_copy3_and_the_staged_layer_step_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_copy3_writes_pinned_memory_through_mapped_views():
    from ktengine.cuda_host import mapped_tensor
    from ktengine.moe.staging_triton import copy3

    srcs = (torch.randn(8, 2048, device="cuda").bfloat16(),
            torch.randint(0, 128, (8, 8), device="cuda"), torch.rand(8, 8, device="cuda"))
    hosts = tuple(torch.zeros(s.shape, dtype=s.dtype).pin_memory() for s in srcs)
    copy3(srcs, tuple(mapped_tensor(h) for h in hosts))
    torch.cuda.synchronize()
    assert all(torch.equal(h, s.cpu()) for h, s in zip(hosts, srcs))
