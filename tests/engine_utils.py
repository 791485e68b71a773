"""Running a checkpoint through ktengine's model directly (no engine loop), for logit checks."""
from __future__ import annotations

import torch

from ktengine.kv_cache import KVCache, slots_of
from ktengine.model.attention import AttentionMetadata, build_group


def prefill_logits(model, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
    """Logits [T, vocab] of every prompt position, computed in chunks of `chunk` tokens."""
    cfg = model.config
    n, block = len(token_ids), 16
    kv = KVCache(cfg.num_layers, -(-n // block), block, cfg.num_kv_heads, cfg.head_dim, cfg.dtype,
                 torch.device("cpu"))
    table = kv.allocator.allocate(-(-n // block))
    chunk = chunk or n
    out = []
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        keys = slots_of(table, block, 0, end)
        meta = AttentionMetadata(
            positions=torch.arange(start, end),
            slot_mapping=torch.tensor(slots_of(table, block, start, end)),
            groups=[build_group([0], [end - start], [start], [keys], cfg.sliding_window, torch.device("cpu"))],
        )
        out.append(model(torch.tensor(token_ids[start:end]), meta, kv.layers))
    return torch.cat(out)
