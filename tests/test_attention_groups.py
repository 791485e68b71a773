"""build_group: keys given as block tables give the group that one slot per key gives."""
from __future__ import annotations

import random

import pytest
import torch

from ktengine.kv_cache import slots_of
from ktengine.model.attention import build_group


@pytest.mark.parametrize("seed", range(20))
def test_block_tables_give_the_group_of_key_slots(seed):
    rnd = random.Random(seed)
    bs = rnd.choice([1, 4, 16])
    n = rnd.randint(1, 6)
    q_lens = [rnd.choice([1, 1, rnd.randint(1, 12)]) for _ in range(n)]
    starts = [rnd.randint(0, 70) for _ in range(n)]
    rows = [sum(q_lens[:i]) for i in range(n)]
    # block tables covering each sequence's keys, some with blocks to spare (as a sequence's
    # table has when it has reserved the next block already)
    tables = [rnd.sample(range(400), -(-(s + q) // bs) + rnd.randint(0, 2))
              for s, q in zip(starts, q_lens, strict=True)]
    keys = [slots_of(t, bs, 0, s + q) for t, s, q in zip(tables, starts, q_lens, strict=True)]
    window = rnd.choice([None, 5, 33])
    want = build_group(rows, q_lens, starts, keys, window, torch.device("cpu"))
    got = build_group(rows, q_lens, starts, tables, window, torch.device("cpu"), block_size=bs)
    for name in ("query_index", "key_slots", "mask", "out_rows", "token_rows"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None and b is None) if a is None or b is None else torch.equal(a, b), name
    assert (got.mask is None) == (n == 1 and window is None)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("seed", range(6))
def test_groups_of_one_sequence_attend_causally_without_a_mask(device, seed):
    """paged_attention over mask-free groups (one sequence each: prefill chunks with and
    without earlier context, a lone decode) against attention written out per query."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from ktengine.model.attention import AttentionMetadata, paged_attention

    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads, dim = rnd.choice([(4, 4, 16), (8, 2, 32), (6, 1, 64)])
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    seqs = [(rnd.randint(0, 40), rnd.randint(2, 30)), (0, rnd.randint(2, 30)),
            (rnd.randint(1, 40), 1)]  # (start, q_len)
    slots = rnd.sample(range(1, 300), sum(s + q for s, q in seqs))
    keys, rows, at = [], [], 0
    for start, q in seqs:
        keys.append(slots[:start + q])
        slots = slots[start + q:]
        rows.append(at)
        at += q
    n = at
    k_cache = torch.randn(300, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(300, kv_heads, dim, generator=gen).to(dtype)
    q = torch.randn(n, heads, dim, generator=gen).to(dtype)
    k_new = torch.randn(n, kv_heads, dim, generator=gen).to(dtype)
    v_new = torch.randn(n, kv_heads, dim, generator=gen).to(dtype)
    new_slots = [s for (start, ql), key in zip(seqs, keys, strict=True) for s in key[start:start + ql]]
    groups = [build_group([r], [ql], [start], [key], None, torch.device("cpu"))
              for r, (start, ql), key in zip(rows, seqs, keys, strict=True)]
    assert all(g.mask is None for g in groups)
    positions = [start + i for start, ql in seqs for i in range(ql)]
    meta = AttentionMetadata(torch.tensor(positions), torch.tensor(new_slots), groups)
    dev = torch.device(device)
    meta = AttentionMetadata(
        meta.positions.to(dev), meta.slot_mapping.to(dev),
        [type(g)(*(t if t is None else t.to(dev) for t in (g.query_index, g.key_slots, g.mask,
                                                             g.out_rows, g.token_rows))) for g in groups])
    kc, vc = k_cache.clone().to(dev), v_cache.clone().to(dev)
    got = paged_attention(q.to(dev), k_new.to(dev), v_new.to(dev), meta, (kc, vc), 0.3).float().cpu()

    k_cache[new_slots], v_cache[new_slots] = k_new, v_new
    rep = heads // kv_heads
    for r, (start, ql), key in zip(rows, seqs, keys, strict=True):
        for i in range(ql):
            kk = k_cache[key[:start + i + 1]].float().repeat_interleave(rep, dim=1)  # [c, heads, D]
            vv = v_cache[key[:start + i + 1]].float().repeat_interleave(rep, dim=1)
            p = torch.softmax(torch.einsum("hd,chd->hc", q[r + i].float(), kk) * 0.3, dim=-1)
            want = torch.einsum("hc,chd->hd", p, vv)
            tol = 1e-5 if device == "cpu" else 2e-2
            torch.testing.assert_close(got[r + i], want, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (6, 3), (32, 4)])
def test_grouped_decode_attention_is_attention_with_repeated_kv_heads(device, heads, kv_heads):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import torch.nn.functional as F

    from ktengine.model.attention import grouped_decode_attention

    gen = torch.Generator().manual_seed(heads)
    b, c, d = 5, 37, 32
    q, k, v = (torch.randn(*s, generator=gen) for s in ((b, heads, 1, d), (b, kv_heads, c, d), (b, kv_heads, c, d)))
    mask = torch.rand(b, 1, 1, c, generator=gen) < 0.6
    mask[..., 0] = True
    rep = heads // kv_heads
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask, scale=0.2)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        got = grouped_decode_attention(*(t.to(device, dtype) for t in (q, k, v)), mask.to(device), 0.2)
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol)
