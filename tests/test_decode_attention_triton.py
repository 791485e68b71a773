"""The Triton paged decode attention (model/decode_attention_triton.py) against a small torch
reference that gathers each row's keys by position and takes the softmax in fp32.

On this machine in Triton's interpreter (a subprocess: TRITON_INTERPRET must be set before
triton is imported), with small splits so that a few dozen keys already span several; on a GPU
(`pytest -m gpu`) at Qwen3-30B-A3B's shapes, inside torch.compile, inside a CUDA graph, and
through attention.decode_attention against its torch path.
"""
from __future__ import annotations

import dataclasses
from itertools import product

import pytest
import torch
from interpreter import run_interpreted

from ktengine.model.attention import DecodeTables, decode_attention

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, window=None):
    """[B, heads, D] fp32: row b attends to positions max(0, ctx - window) .. ctx - 1."""
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    out = []
    for b, ctx in enumerate(context_lens.tolist()):
        pos = torch.arange(max(0, ctx - window) if window else 0, ctx, device=q.device)
        slots = block_tables[b, pos // block_size] * block_size + pos % block_size
        k = k_cache[slots].float().repeat_interleave(heads // kv_heads, dim=1)  # [n, heads, D]
        v = v_cache[slots].float().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale  # [heads, n]
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(out)


def _check(got, want, dtype, what=""):
    """fp32: 1e-5 of the output's scale. bf16: two ulps at the output's scale (2^-6 of it,
    twice the ulp of a value just under a power of two): the output's own rounding, which
    Triton's interpreter truncates, and the probabilities rounded to bf16 for the P·V
    product (seen here: up to 0.9 · 2^-7)."""
    assert got.dtype == dtype and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    err = (got.float() - want).abs().max().item()
    scale = want.abs().max().item()
    bound = (1e-5 if dtype == torch.float32 else 2.0**-6) * scale
    assert err <= bound, (what, err, scale)


def _inputs(gen, batch, heads, kv_heads, d, block_size, max_blocks, contexts, window, dtype,
            poison=True):
    """Random q and caches, and block tables whose real blocks are distinct and shuffled; the
    entries past each context (and those of blocks wholly before the window) hold garbage but
    valid ids: half of them a block of NaN (poison), which the kernel must never read."""
    num_blocks = batch * max_blocks + 5  # the last: poison
    k_cache = torch.randn(num_blocks * block_size, kv_heads, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, d, generator=gen).to(dtype)
    poison_block = num_blocks - 1
    if poison:
        k_cache[poison_block * block_size:] = float("nan")
        v_cache[poison_block * block_size:] = float("nan")
    free = torch.randperm(num_blocks - 1, generator=gen)
    tables = torch.empty(batch, max_blocks, dtype=torch.int64)
    for b, ctx in enumerate(contexts):
        tables[b] = free[b * max_blocks:(b + 1) * max_blocks]
        garbage = torch.randint(0, num_blocks - 1, (max_blocks,), generator=gen)
        garbage[::2] = poison_block
        first = max(0, ctx - window) // block_size if window else 0
        used = torch.arange(max_blocks)
        unused = (used >= -(-ctx // block_size)) | (used < first)
        tables[b] = torch.where(unused, garbage, tables[b])
    q = torch.randn(batch, heads, d, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables


def _interpreter_cases() -> None:
    """Run by the interpreter test's subprocess."""
    from ktengine.model.decode_attention_triton import SPLIT_KEYS, paged_decode_attention

    gen = torch.Generator().manual_seed(0)
    windows = [None, 1, 7, None, 40, None]
    case = 0
    for (heads, kv_heads), d, bs in product([(4, 4), (8, 2), (32, 4)], (64, 128), (4, 16)):
        max_blocks = 16 if bs == 4 else 12  # 64 or 192 keys
        mid_block = 6 if bs == 4 else 24
        # splits: mid-block, several tiles each (100), or one for the whole table
        for dtype, split_keys in ((torch.float32, mid_block), (torch.bfloat16, 100),
                                  (torch.float32, SPLIT_KEYS), (torch.bfloat16, mid_block)):
            window = windows[case % len(windows)]
            full = max_blocks * bs
            # one, a partial block, a block boundary, several splits (a full table or one short)
            kinds = [1, 2 * bs + 3, 3 * bs, full - case % 2]
            contexts = kinds[1:] if case % 3 else [kinds[case // 3 % 4]]
            if case % 3 == 2:
                contexts[0] = 1
            batch = len(contexts)
            q, k_cache, v_cache, tables = _inputs(gen, batch, heads, kv_heads, d, bs, max_blocks,
                                                  contexts, window, dtype)
            ctx = torch.tensor(contexts, dtype=(torch.int64, torch.int32)[case % 2])
            scale = d**-0.5
            got = paged_decode_attention(q, k_cache, v_cache, tables, ctx, bs, scale, window,
                                         split_keys)
            want = reference(q, k_cache, v_cache, tables, ctx, bs, scale, window)
            _check(got, want, dtype, (heads, kv_heads, d, bs, split_keys, window, contexts))
            case += 1

    # more splits than the combine kernel reads at a time; a non-contiguous q; a row without
    # keys (not a decode step's, but its output is defined: zeros, not NaN)
    contexts = [128, 1, 77, 0]
    q, k_cache, v_cache, tables = _inputs(gen, 4, 8, 2, 64, 4, 32, contexts, None,
                                          torch.float32)
    wide = torch.randn(4, 11, 64, generator=gen)
    wide[:, 3:] = q
    q = wide[:, 3:]
    ctx = torch.tensor(contexts)
    want = reference(q, k_cache, v_cache, tables, ctx, 4, 0.3)
    for split_keys in (4, SPLIT_KEYS):  # 32 splits, one
        got = paged_decode_attention(q, k_cache, v_cache, tables, ctx, 4, 0.3, None, split_keys)
        _check(got, want, torch.float32, split_keys)
        assert torch.equal(got[3], torch.zeros_like(got[3]))

    # keys per split from the shapes: one split at 256 keys; at 512, 128 per split for batch 1
    # (4 programs a split), 256 for batch 3 (12)
    for max_blocks, contexts in ((16, [256]), (16, [1, 100, 255]), (32, [300]), (32, [1, 257, 512])):
        q, k_cache, v_cache, tables = _inputs(gen, len(contexts), 8, 4, 64, 16, max_blocks,
                                              contexts, None, torch.bfloat16)
        ctx = torch.tensor(contexts)
        got = paged_decode_attention(q, k_cache, v_cache, tables, ctx, 16, 0.125)
        _check(got, reference(q, k_cache, v_cache, tables, ctx, 16, 0.125), torch.bfloat16,
               contexts)

    _decode_attention_takes_the_kernel(gen)


def _decode_attention_takes_the_kernel(gen) -> None:
    """decode_attention on tables marked for the kernel (build marks them on CUDA only) gives
    what the torch path gives with the tables' slots and mask; a head size the kernel does not
    serve falls back to gathering."""
    for d, window in ((64, None), (64, 5), (80, 9)):
        contexts = [1, 19, 40]
        q, k_cache, v_cache, tables = _inputs(gen, 3, 8, 2, d, 4, 10, contexts, window,
                                              torch.float32, poison=False)
        torch_path = DecodeTables.build(tables, torch.tensor(contexts), 4, window)
        assert not torch_path.triton and torch_path.slots is not None  # CPU tensors
        kernel_path = dataclasses.replace(torch_path, slots=None, mask=None, triton=True)
        want = decode_attention(q, k_cache, v_cache, torch_path, 0.2)
        got = decode_attention(q, k_cache, v_cache, kernel_path, 0.2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_keys_per_split_follow_the_shapes():
    pytest.importorskip("triton")
    from ktengine.model.decode_attention_triton import split_keys_for

    assert split_keys_for(4, 256) == split_keys_for(128, 256) == 256  # the smallest bucket: one
    assert split_keys_for(4, 512) == split_keys_for(8, 8192) == 128  # few programs a split
    assert split_keys_for(12, 512) == split_keys_for(32, 8192) == 256


def test_kernel_matches_the_reference_in_the_interpreter():
    run_interpreted("test_decode_attention_triton")


def test_cpu_tables_keep_the_torch_path(monkeypatch):
    """Off CUDA the step gathers whatever the switch says (and never imports triton for it)."""
    monkeypatch.setenv("KTENGINE_TRITON_DECODE_ATTENTION", "1")
    tables = DecodeTables.build(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([1, 5]), 4)
    assert not tables.triton
    assert tables.slots.shape == (2, 12) and tables.mask.shape == (2, 1, 1, 12)


# -- on a GPU: Qwen3-30B-A3B's attention shapes ------------------------------------------------

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 4, 128, 16


def _bucket(ctx: int) -> int:
    """The context bucket decode_graphs would take: blocks, a power of two, at least 16."""
    return max(16, 1 << (-(-ctx // BLOCK_SIZE) - 1).bit_length())


def _gpu_inputs(gen, batch, ctx, window=None, poison=True):
    """Row 0 at ctx, the others at random lengths up to it; tables padded to ctx's bucket."""
    contexts = [ctx] + torch.randint(1, ctx + 1, (batch - 1,), generator=gen).tolist()
    q, k_cache, v_cache, tables = _inputs(gen, batch, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE,
                                          _bucket(ctx), contexts, window, torch.bfloat16,
                                          poison)
    ctx_t = torch.tensor(contexts)
    return [t.cuda() for t in (q, k_cache, v_cache, tables, ctx_t)]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("ctx", [1, 40, 256, 1000, 8192])
@pytest.mark.parametrize("window", [None, 300])
def test_kernel_matches_the_reference_on_cuda(batch, ctx, window):
    from ktengine.model.decode_attention_triton import paged_decode_attention

    gen = torch.Generator().manual_seed(ctx * 10 + batch)
    q, k_cache, v_cache, tables, ctx_t = _gpu_inputs(gen, batch, ctx, window)
    got = paged_decode_attention(q, k_cache, v_cache, tables, ctx_t, BLOCK_SIZE, 0.088, window)
    want = reference(q, k_cache, v_cache, tables, ctx_t, BLOCK_SIZE, 0.088, window)
    _check(got, want, torch.bfloat16)
    # fp32 caches: fp32 products
    q, k_cache, v_cache = q.float(), k_cache.float(), v_cache.float()
    got = paged_decode_attention(q, k_cache, v_cache, tables, ctx_t.int(), BLOCK_SIZE, 0.088,
                                 window)
    _check(got, reference(q, k_cache, v_cache, tables, ctx_t, BLOCK_SIZE, 0.088, window),
           torch.float32)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("heads,kv_heads,d", [(16, 2, 64), (8, 8, 256), (12, 4, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_other_head_sizes_on_cuda(heads, kv_heads, d, dtype):
    """The tile sizes of the other head sizes (32 keys at D = 256 in bf16, 16 in fp32)."""
    from ktengine.model.decode_attention_triton import paged_decode_attention

    gen = torch.Generator().manual_seed(d + heads)
    contexts = [1000, 1, 333]
    inputs = _inputs(gen, 3, heads, kv_heads, d, BLOCK_SIZE, 64, contexts, None, dtype)
    q, k_cache, v_cache, tables = (t.cuda() for t in inputs)
    ctx = torch.tensor(contexts, device="cuda")
    for window in (None, 50):
        got = paged_decode_attention(q, k_cache, v_cache, tables, ctx, BLOCK_SIZE, d**-0.5,
                                     window)
        want = reference(q, k_cache, v_cache, tables, ctx, BLOCK_SIZE, d**-0.5, window)
        _check(got, want, dtype, window)


@pytest.mark.gpu
@cuda
def test_kernel_traces_under_torch_compile():
    """fullgraph and dynamic shapes, as decoder.compiled_attend_route compiles it: batch sizes
    and context buckets of one or several splits, each against the eager op."""
    from ktengine.model.decode_attention_triton import paged_decode_attention

    def attend(q, k_cache, v_cache, tables, ctx):
        out = paged_decode_attention(q * 1.5, k_cache, v_cache, tables, ctx, BLOCK_SIZE, 0.088)
        return out.float() + 1

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(3)
    for batch, ctx in [(1, 40), (8, 40), (4, 200), (8, 1000), (1, 1000), (2, 8192)]:
        inputs = _gpu_inputs(gen, batch, ctx)
        got = compiled(*inputs)
        want = attend(*inputs)
        assert (got - want).abs().max().item() <= 2.0**-8 * want.abs().max().item()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("max_blocks", [16, 64])  # one split, several
def test_kernel_replays_in_a_cuda_graph(max_blocks):
    """Captured once on static inputs; each replay after new context lengths and block tables
    are copied in must give the reference of those."""
    from ktengine.model.decode_attention_triton import paged_decode_attention

    gen = torch.Generator().manual_seed(4)
    batch = 8
    # no poison: the new tables below may point anywhere
    q, k_cache, v_cache, tables, ctx = _gpu_inputs(gen, batch, max_blocks * BLOCK_SIZE,
                                                   poison=False)
    out = paged_decode_attention(q, k_cache, v_cache, tables, ctx, BLOCK_SIZE, 0.088)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k_cache, v_cache, tables, ctx, BLOCK_SIZE, 0.088)
    num_blocks = k_cache.shape[0] // BLOCK_SIZE
    for _ in range(3):
        new_ctx = torch.randint(1, max_blocks * BLOCK_SIZE + 1, (batch,), generator=gen)
        new_tables = torch.randint(0, num_blocks, (batch, max_blocks), generator=gen)
        q.copy_(torch.randn(batch, HEADS, HEAD_DIM, generator=gen).to(q))
        ctx.copy_(new_ctx)
        tables.copy_(new_tables)
        graph.replay()
        want = reference(q, k_cache, v_cache, tables, ctx, BLOCK_SIZE, 0.088)
        _check(out, want, torch.bfloat16)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("batch,ctx", [(1, 40), (8, 1000)])
def test_decode_attention_matches_its_torch_path(monkeypatch, batch, ctx, window):
    gen = torch.Generator().manual_seed(5)
    # no poison: the torch path gathers every block of the table, and SDPA's mask does not
    # stop a NaN
    q, k_cache, v_cache, tables, ctx_t = _gpu_inputs(gen, batch, ctx, window, poison=False)
    out = {}
    for switch in ("0", "1"):
        monkeypatch.setenv("KTENGINE_TRITON_DECODE_ATTENTION", switch)
        decode = DecodeTables.build(tables, ctx_t, BLOCK_SIZE, window)
        assert decode.triton == (switch == "1") and (decode.slots is None) == decode.triton
        out[switch] = decode_attention(q, k_cache, v_cache, decode, 0.088)
    want = reference(q, k_cache, v_cache, tables, ctx_t, BLOCK_SIZE, 0.088, window)
    _check(out["1"], want, torch.bfloat16)
    _check(out["0"], want, torch.bfloat16)  # the torch path, for what the bound allows
