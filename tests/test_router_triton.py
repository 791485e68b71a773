"""The one-kernel router (moe/router_triton.py) against torch's softmax, top-k and
renormalisation.

On this machine in Triton's interpreter (a subprocess: TRITON_INTERPRET must be set before
triton is imported); on a GPU (`pytest -m gpu`) eagerly, inside torch.compile and replayed
in a CUDA graph.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from interpreter import run_interpreted

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _reference(logits, top_k, renormalize):
    """route()'s ops after the GEMV, with the kernel's tie rule: a stable descending sort keeps
    equal probs in id order. ids [T, k] int64, weights [T, k] float32."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, ids = weights[:, :top_k], ids[:, :top_k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def _check(got, logits, top_k, renormalize):
    """The same set of ids per row as the reference, the same weight per id to 1e-6 relative
    (a few ulps of fp32: sums taken in another order), and each row in descending weight order
    with equal weights in id order."""
    ids, weights = got
    t = logits.shape[0]
    assert ids.shape == weights.shape == (t, top_k)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert ids.device == weights.device == logits.device
    want_ids, want_weights = _reference(logits, top_k, renormalize)
    got_ids, got_order = ids.sort(dim=-1)
    want_ids, want_order = want_ids.sort(dim=-1)
    assert torch.equal(got_ids, want_ids), (logits.shape, top_k)
    torch.testing.assert_close(weights.gather(1, got_order), want_weights.gather(1, want_order),
                               rtol=1e-6, atol=1e-30)
    head, tail = weights[:, :-1], weights[:, 1:]
    assert ((head > tail) | ((head == tail) & (ids[:, :-1] < ids[:, 1:]))).all()


def _random_cases() -> None:
    from ktengine.moe.router_triton import topk_softmax

    gen = torch.Generator().manual_seed(0)
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    case = 0  # dtype and renormalize turn with the case: all six pairs every six cases
    for e in (1, 3, 8, 60, 128, 512):
        for k in (k for k in (1, 2, 8, 10) if k <= e):
            for t in (1, 5, 33):
                dtype, renormalize = dtypes[case % 3], case % 2 == 0
                case += 1
                logits = (2 * torch.randn(t, e, generator=gen)).to(dtype)
                _check(topk_softmax(logits, k, renormalize), logits, k, renormalize)
    # strided rows and columns: a transposed view
    logits = torch.randn(60, 7, generator=gen).t()
    _check(topk_softmax(logits, 8, True), logits, 8, True)
    # k = 32, the most unrolled
    logits = torch.randn(3, 512, generator=gen).bfloat16()
    _check(topk_softmax(logits, 32, True), logits, 32, True)
    for e, k in [(8, 0), (8, 9), (64, 33)]:
        with pytest.raises(ValueError, match="top_k"):
            topk_softmax(torch.zeros(2, e), k, False)


def _tie_cases(device: str) -> None:
    """Equal probs go to the lower id, in order; far-off logits give exact 0s, never NaN."""
    from ktengine.moe.router_triton import topk_softmax

    flat = torch.zeros(3, 60, dtype=torch.bfloat16, device=device)  # all equal: ids 0..7
    ids, weights = topk_softmax(flat, 8, False)
    assert torch.equal(ids, torch.arange(8, device=device).expand(3, 8))
    assert torch.equal(weights, torch.softmax(flat.float(), -1)[:, :8])
    ids, weights = topk_softmax(flat, 8, True)
    assert torch.equal(weights, torch.full_like(weights, 0.125))  # 8p / 8p, exact

    # two equal tops, then four equal values straddling the k-th (4th) place
    row = torch.full((16,), -1.0)
    row[[7, 3]] = 2.0
    row[[12, 9, 5, 1]] = 1.0
    logits = row.expand(2, 16).bfloat16().to(device)
    for k, want in [(1, [3]), (2, [3, 7]), (3, [3, 7, 1]), (4, [3, 7, 1, 5])]:
        ids, weights = topk_softmax(logits, k, False)
        assert ids.tolist() == [want] * 2, k
        want_weights = torch.softmax(logits.float(), -1)[:, want]
        torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=0)

    # rows of few distinct values: ties everywhere, and the order must be the reference's
    gen = torch.Generator().manual_seed(1)
    logits = torch.randint(-2, 3, (40, 128), generator=gen).bfloat16().to(device)
    for k in (1, 8, 10):
        ids, weights = topk_softmax(logits, k, True)
        want_ids, want_weights = _reference(logits, k, True)
        assert torch.equal(ids, want_ids), k
        torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=0)

    # ±1e4: every prob but the largest underflows to 0, and the 0s tie (lower id first)
    logits = torch.full((3, 64), -1e4, device=device)
    logits[0, 5] = 1e4
    logits[1, [9, 40]] = 1e4  # two halves
    logits[2] = 1e4 * torch.linspace(-1, 1, 64)  # distinct logits, yet 0s from the 2nd on
    for renormalize in (False, True):
        ids, weights = topk_softmax(logits, 4, renormalize)
        assert torch.isfinite(weights).all()
        assert ids.tolist() == [[5, 0, 1, 2], [9, 40, 0, 1], [63, 0, 1, 2]]
        assert weights.tolist() == [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [1, 0, 0, 0]]


def _interpreter_cases() -> None:
    """Run by the interpreter test's subprocess."""
    _random_cases()
    _tie_cases("cpu")


def test_topk_softmax_matches_torch_in_the_interpreter():
    run_interpreted("test_router_triton")


def _logits(t, e, seed, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(t, e, generator=gen)).bfloat16().to(device)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("e,k", [(128, 8), (512, 10)])
@pytest.mark.parametrize("t", [1, 8, 300, 4096])
def test_topk_softmax_matches_torch_on_cuda(t, e, k):
    from ktengine.moe.router_triton import topk_softmax

    logits = _logits(t, e, seed=t + e)
    for renormalize in (False, True):
        _check(topk_softmax(logits, k, renormalize), logits, k, renormalize)
    if t == 1 and e == 128:
        _tie_cases("cuda")


@pytest.mark.gpu
@cuda
def test_topk_softmax_under_torch_compile():
    from ktengine.moe.router_triton import topk_softmax

    def route(x, router_weight):
        logits = F.linear(x, router_weight)  # [T, E]
        return logits, *topk_softmax(logits, 10, True)

    compiled = torch.compile(route, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(0)
    router_weight = (torch.randn(512, 256, generator=gen) / 16).bfloat16().cuda()
    for t in (1, 8, 300):  # dynamo specialises T = 1; 8 and 300 share a symbolic T
        x = torch.randn(t, 256, generator=gen).bfloat16().cuda()
        logits, ids, weights = compiled(x, router_weight)
        # checked on the logits the compiled GEMM produced, which may round otherwise
        _check((ids, weights), logits, 10, True)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("e,k", [(128, 8), (512, 10)])
def test_topk_softmax_replays_in_a_cuda_graph(e, k):
    from ktengine.moe.router_triton import topk_softmax

    static = _logits(8, e, seed=0)
    topk_softmax(static, k, True)  # compiles the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids, weights = topk_softmax(static, k, True)
    for seed in range(1, 4):
        logits = _logits(8, e, seed)
        static.copy_(logits)
        graph.replay()
        _check((ids, weights), logits, k, True)
