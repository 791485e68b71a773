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
        assert torch.equal(getattr(got, name), getattr(want, name)), name
