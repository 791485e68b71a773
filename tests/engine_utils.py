"""Running a checkpoint through ktengine's model directly (no engine loop), for logit checks."""
from __future__ import annotations

import torch

from ktengine.kv_cache import KVCache, slots_of
from ktengine.model.attention import AttentionMetadata, build_group
from ktengine.state_cache import StateCache, build_state_metadata, layer_caches


def prefill_logits(model, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
    """Logits [T, vocab] of every prompt position, computed in chunks of `chunk` tokens."""
    cfg = model.config
    n, block = len(token_ids), 16
    state = None
    if cfg.linear_attention is not None:  # one state slot (slot 1: slot 0 stays unused)
        state = StateCache(len(cfg.linear_layer_ids), 2, cfg.linear_attention, cfg.dtype,
                           torch.device("cpu"))
    kv = KVCache(len(cfg.kv_layer_ids), -(-n // block), block, cfg.num_kv_heads, cfg.head_dim,
                 cfg.dtype, torch.device("cpu"), state=state)
    caches = layer_caches(cfg, kv.layers, state)
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
            state=None if state is None else build_state_metadata(
                [(0, end - start, 1, start > 0)], torch.device("cpu")),
        )
        out.append(model(torch.tensor(token_ids[start:end]), meta, caches))
    return torch.cat(out)
