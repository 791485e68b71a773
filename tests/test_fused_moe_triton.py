"""The Triton fused MoE (moe/fused_moe_triton.py) against tests/reference.py.

On this machine in Triton's interpreter (a subprocess: TRITON_INTERPRET must be set before
triton is imported); on a GPU (`pytest -m gpu`) at Qwen3-30B-A3B's shapes and inside a CUDA graph.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from interpreter import run_interpreted
from reference import fused_moe_reference

from ktengine.moe.gpu_experts import GpuExpertSlots, fused_kernel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _weights(gen, c, h, i, dtype, device="cpu"):
    """gate/up [C, I, H], down [C, H, I], scaled so that every product is of order one."""
    gate = torch.randn(c, i, h, generator=gen) / h**0.5
    up = torch.randn(c, i, h, generator=gen) / h**0.5
    down = torch.randn(c, h, i, generator=gen) / i**0.5
    return [w.to(device, dtype) for w in (gate, up, down)]


def _check(got, x, gate, up, down, slots, w):
    """got [T, H] in x.dtype against the reference computed the same way (h in x.dtype).

    fp32: 1e-4 of the output's scale. bf16: one ulp of the output (2^-7 relative: its rounding
    after fp32 sums taken in another order) plus one ulp at the output's scale for h, which may
    round the other way (Triton's interpreter truncates fp32 -> bf16 where the GPU rounds).
    """
    want = fused_moe_reference(x, gate, up, down, slots, w, act_dtype=x.dtype)
    assert got.dtype == x.dtype and got.shape == x.shape
    scale = want.abs().max().item()
    err = (got.float() - want).abs()
    if x.dtype == torch.float32:
        assert err.max().item() <= 1e-4 * scale, (err.max().item(), scale)
    else:
        bound = 2.0**-7 * (want.abs() + scale)
        assert (err <= bound).all(), ((err - bound).max().item(), scale)


def _interpreter_cases() -> None:
    """Run by the interpreter test's subprocess."""
    from ktengine.moe.fused_moe_triton import fused_experts, pick_tiles

    gen = torch.Generator().manual_seed(0)
    shapes = [(80, 48), (128, 64)]  # H, I: not multiples of the block sizes, and multiples
    case = 0
    for t in (1, 3, 17, 70):
        for k in (1, 2, 8):
            for c in (1, 5, 16):
                dtype = (torch.float32, torch.bfloat16)[case % 2]
                h, i = shapes[case // 2 % 2]
                case += 1
                x = torch.randn(t, h, generator=gen).to(dtype)
                gate, up, down = _weights(gen, c, h, i, dtype)
                slots = torch.randint(0, c + 1, (t, k), generator=gen)  # c: not resident
                if t * k > 1:  # both kinds, whatever the draw
                    slots[0, 0], slots[-1, -1] = c, c - 1
                w = torch.rand(t, k, generator=gen)
                for by_pair in (False, True):  # either grid serves any call
                    got = fused_experts(x, gate, up, down, slots, w, by_pair=by_pair)
                    _check(got, x, gate, up, down, slots, w)
                if case % 5 == 0:  # the unreduced rows sum to the same output
                    rows = fused_experts(x, gate, up, down, slots, w, reduce=False)
                    assert rows.shape == (t, k, h) and rows.dtype == torch.float32
                    assert torch.equal(rows.sum(1).to(dtype), got)

    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(9, 80, generator=gen).to(dtype)
        gate, up, down = _weights(gen, 5, 80, 48, dtype)
        w = torch.rand(9, 2, generator=gen)
        for by_pair in (False, True):
            none = fused_experts(x, gate, up, down, torch.full((9, 2), 5), w, by_pair=by_pair)
            assert torch.equal(none, torch.zeros_like(x))  # all non-resident
            none = fused_experts(x, gate, up, down, torch.full((9, 2), 5), w, reduce=False)
            assert none.shape == (9, 2, 80) and not none.any()
            one = torch.full((9, 2), 3)  # every pair on one slot
            _check(fused_experts(x, gate, up, down, one, w, by_pair=by_pair), x, gate, up, down,
                   one, w)

    # the middle and prefill tiles (slots whose pairs span many BLOCK_M tiles), and k = 10 over
    # 512 slots (most programs find no pairs)
    assert len({pick_tiles(n) for n in (1, 40 * 8, 300 * 8)}) == 3
    for t, k, c, dtype in [(40, 8, 3, torch.float32), (300, 8, 2, torch.float32),
                           (4, 10, 512, torch.bfloat16)]:
        x = torch.randn(t, 80, generator=gen).to(dtype)
        gate, up, down = _weights(gen, c, 80, 48, dtype)
        slots = torch.randint(0, c + 1, (t, k), generator=gen)
        w = torch.rand(t, k, generator=gen)
        _check(fused_experts(x, gate, up, down, slots, w), x, gate, up, down, slots, w)

    # a call over MAX_PAIRS pairs runs in slices of whole tokens, with the same result
    import ktengine.moe.fused_moe_triton as fmt

    x = torch.randn(23, 80, generator=gen)
    gate, up, down = _weights(gen, 4, 80, 48, torch.float32)
    slots = torch.randint(0, 5, (23, 3), generator=gen)
    w = torch.rand(23, 3, generator=gen)
    whole = fused_experts(x, gate, up, down, slots, w)
    fmt.MAX_PAIRS = 10  # 3 tokens per slice
    assert torch.equal(fused_experts(x, gate, up, down, slots, w), whole)
    assert torch.equal(fused_experts(x, gate, up, down, slots, w, reduce=False).sum(1), whole)
    fmt.MAX_PAIRS = 16384

    _buckets_match_torch_sort(gen)
    _slots_take_the_fused_path(gen)


def _buckets_match_torch_sort(gen) -> None:
    """sort_into_buckets (its one-kernel path up to DECODE_MAX_PAIRS pairs, and torch's above)
    against torch's stable sort and searchsorted, on fresh draws: few and many slots, ties,
    empty buckets; with expert ids mapped to slots, and the counters of the valid rows."""
    from ktengine.moe.fused_moe_triton import DECODE_MAX_PAIRS, sort_into_buckets
    from ktengine.moe.gpu_experts import Counters

    for p, c, k in [(1, 1, 1), (8, 128, 8), (10, 3, 2), (64, 64, 8), (100, 512, 10),
                    (DECODE_MAX_PAIRS, 128, 8), (DECODE_MAX_PAIRS + 8, 16, 8)]:
        slots = torch.randint(0, c + 1, (p,), generator=gen)
        got = sort_into_buckets(slots.view(-1, k), c)
        want_sorted, want_order = torch.sort(slots, stable=True)
        want_offsets = torch.searchsorted(want_sorted, torch.arange(c + 2), out_int32=True)
        for g, w in zip(got, (want_sorted, want_order, want_offsets)):
            assert g.dtype == w.dtype and torch.equal(g, w), (p, c)

        e = 2 * c + 3  # expert ids, c of them resident at random slots
        slot_of_expert = torch.full((e,), c, dtype=torch.long)
        slot_of_expert[torch.randperm(e, generator=gen)[:c]] = torch.randperm(c, generator=gen)
        ids = torch.randint(0, e, (p // k, k), generator=gen)
        valid = torch.rand(p // k, generator=gen) < 0.7
        counters = Counters(valid, torch.full((1,), 5, dtype=torch.int64), torch.ones(e))
        got = sort_into_buckets(ids, c, slot_of_expert, counters)
        mapped = slot_of_expert[ids].reshape(-1)
        want_sorted, want_order = torch.sort(mapped, stable=True)
        want_offsets = torch.searchsorted(want_sorted, torch.arange(c + 2), out_int32=True)
        for g, w in zip(got, (want_sorted, want_order, want_offsets)):
            assert g.dtype == w.dtype and torch.equal(g, w), (p, c, "mapped")
        live = ids[valid]
        assert int(counters.gpu_pairs) == 5 + int((slot_of_expert[live] < c).sum())
        assert torch.equal(counters.routes, 1 + torch.bincount(live.reshape(-1), minlength=e).float())


def _slots_take_the_fused_path(gen) -> None:
    """GpuExpertSlots calls the kernel for SiLU (forward and forward_static, whose counter
    still counts) and keeps torch for another activation."""
    e, h, i, t, k = 12, 80, 48, 6, 3
    gate, up, down = _weights(gen, e, h, i, torch.float32)
    resident = [0, 3, 4, 8, 11]
    slots = GpuExpertSlots(gate, up, down, resident, e, torch.device("cpu"))
    assert slots.fused is not None
    calls = []
    kernel = slots.fused
    slots.fused = lambda *args, **kw: calls.append(1) or kernel(*args, **kw)
    x = torch.randn(t, h, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=gen)
    mask = torch.zeros(e, dtype=torch.bool)
    mask[resident] = True
    want = fused_moe_reference(x, gate, up, down, ids, w, gpu_mask_row=~mask)
    counter = torch.zeros(1, dtype=torch.int64)
    routes = torch.zeros(e)
    valid = torch.arange(t) < t - 2
    got = slots.forward_static(x, ids, w, F.silu, counter, valid, routes)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert int(counter) == int((mask[ids] & valid[:, None]).sum())
    assert torch.equal(routes, torch.bincount(ids[valid].reshape(-1), minlength=e).float())
    torch.testing.assert_close(slots.forward(x, ids, w, torch.nn.SiLU()), want, rtol=1e-4,
                               atol=1e-4)
    assert len(calls) == 2
    slots.forward(x, ids, w, F.gelu)
    slots.forward_static(x, ids, w, F.gelu)
    assert len(calls) == 2


def test_fused_experts_match_the_reference_in_the_interpreter():
    run_interpreted("test_fused_moe_triton", KTENGINE_FUSED_MOE="1")


def test_the_kernel_is_chosen_only_where_it_runs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("KTENGINE_FUSED_MOE", raising=False)
    assert fused_kernel(torch.device("cpu"), torch.float32) is None  # torch on a CPU
    assert fused_kernel(torch.device("cuda"), torch.float8_e4m3fn) is None  # dtype it lacks
    monkeypatch.setenv("KTENGINE_FUSED_MOE", "0")
    assert fused_kernel(torch.device("cuda"), torch.bfloat16) is None  # switched off
    monkeypatch.setenv("KTENGINE_FUSED_MOE", "yes")
    with pytest.raises(ValueError, match="KTENGINE_FUSED_MOE"):
        fused_kernel(torch.device("cuda"), torch.bfloat16)


# ---- on a GPU: Qwen3-30B-A3B's expert shapes (64 of its 128 experts resident)

H, I, E, C, K = 2048, 768, 128, 64, 8


def _routed(gen, t, device):
    """topk_ids [T, K] (distinct experts per token), topk_weights [T, K] fp32."""
    ids = torch.rand(t, E, generator=gen).topk(K, dim=1).indices
    w = torch.softmax(torch.randn(t, K, generator=gen), dim=1)
    return ids.to(device), w.to(device)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("by_pair", [False, True])
@pytest.mark.parametrize("tokens", [1, 8, 32, 512])
def test_fused_experts_on_cuda_match_the_reference(tokens, by_pair):
    from ktengine.moe.fused_moe_triton import fused_experts

    gen = torch.Generator().manual_seed(tokens)
    gate, up, down = _weights(gen, C, H, I, torch.bfloat16, "cuda")
    slot_of_expert = torch.randperm(E, generator=gen).clamp(max=C).cuda()  # half resident
    ids, w = _routed(gen, tokens, "cuda")
    x = torch.randn(tokens, H, generator=gen).to("cuda", torch.bfloat16)
    slots = slot_of_expert[ids]
    got = fused_experts(x, gate, up, down, slots, w, by_pair=by_pair)
    _check(got, x, gate, up, down, slots, w)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tokens", [1, 32])
def test_forward_static_with_the_kernel_replays_in_a_cuda_graph(tokens, monkeypatch):
    monkeypatch.delenv("KTENGINE_FUSED_MOE", raising=False)
    gen = torch.Generator().manual_seed(0)
    host = _weights(gen, E, H, I, torch.bfloat16)
    resident = sorted(torch.randperm(E, generator=gen)[:C].tolist())
    slots = GpuExpertSlots(*host, resident, E, torch.device("cuda"))
    assert slots.fused is not None
    x = torch.zeros(tokens, H, dtype=torch.bfloat16, device="cuda")
    ids = torch.zeros(tokens, K, dtype=torch.long, device="cuda")
    w = torch.zeros(tokens, K, device="cuda")
    valid = torch.ones(tokens, dtype=torch.bool, device="cuda")
    counter = torch.zeros(1, dtype=torch.int64, device="cuda")
    routes = torch.zeros(E, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles the kernels before the capture
        slots.forward_static(x, ids, w, F.silu, counter, valid, routes)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = slots.forward_static(x, ids, w, F.silu, counter, valid, routes)
    mask = torch.zeros(E, dtype=torch.bool)
    mask[resident] = True
    for step in range(2):  # new inputs in the captured buffers
        new_ids, new_w = _routed(gen, tokens, "cuda")
        x.copy_(torch.randn(tokens, H, generator=gen).to(torch.bfloat16))
        ids.copy_(new_ids)
        w.copy_(new_w)
        valid.copy_(torch.rand(tokens, generator=gen) < 0.8)
        counter.zero_()
        routes.zero_()
        graph.replay()
        want_slots = slots.slot_of_expert[ids]
        _check(out, x, slots.gate, slots.up, slots.down, want_slots, w)
        live = ids.cpu()[valid.cpu()]
        assert int(counter) == int(mask[live].sum()), step
        assert torch.equal(routes.cpu(), torch.bincount(live.reshape(-1), minlength=E).float())
