"""Running a checkpoint through ktengine's model directly (no engine loop), for logit checks;
and reading an engine's stream part way."""
from __future__ import annotations

import torch

from ktengine.kv_cache import KVCache, slots_of
from ktengine.model.attention import AttentionMetadata, build_group
from ktengine.state_cache import StateCache, build_state_metadata, layer_caches


def prefill_logits(
    model, token_ids: list[int], chunk: int | None = None, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Logits [T, vocab] of every prompt position, computed in chunks of `chunk` tokens, with
    the model (routed experts too) and its caches on `device`."""
    cfg, device = model.config, torch.device(device)
    n, block = len(token_ids), 16
    state = None
    if cfg.linear_attention is not None:  # one state slot (slot 1: slot 0 stays unused)
        state = StateCache(len(cfg.linear_layer_ids), 2, cfg.linear_attention, cfg.dtype, device)
    kv = KVCache(len(cfg.kv_layer_ids), -(-n // block), block, cfg.num_kv_heads, cfg.head_dim,
                 cfg.dtype, device, state=state)
    caches = layer_caches(cfg, kv.layers, state)
    table = kv.allocator.allocate(-(-n // block))
    chunk = chunk or n
    out = []
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        keys = slots_of(table, block, 0, end)
        meta = AttentionMetadata(
            positions=torch.arange(start, end, device=device),
            slot_mapping=torch.tensor(slots_of(table, block, start, end), device=device),
            groups=[build_group([0], [end - start], [start], [keys], cfg.sliding_window, device)],
            state=None if state is None else build_state_metadata(
                [(0, end - start, 1, start > 0)], device),
        )
        out.append(model(torch.tensor(token_ids[start:end], device=device), meta, caches))
    return torch.cat(out)


def check_fp8_logits(fp8: torch.Tensor, dequantized: torch.Tensor, original: torch.Tensor) -> None:
    """Logits [T, vocab] of a model with fp8 layers against the same fp8 checkpoint run on its
    dequantized weights, with the unquantized checkpoint's as the yardstick.

    Activations are rounded to e4m3 in 1 x 128 groups, the weights in 128 x 128 blocks: the same
    3-bit rounding on finer groups, so quantizing the activations may move the logits by about
    as much as quantizing the weights did (measured on these models: 0.6-0.9 times), not more
    than 1.5 times; a scale read from the wrong block moves them by their whole spread.
    """
    def drift(a, b):
        return ((a - b).norm() / (b - b.mean()).norm()).item()

    assert 1e-3 < drift(fp8, dequantized) <= 1.5 * drift(dequantized, original)
    # the greedy token at each position mostly agrees (these random models have near-ties)
    assert (fp8.argmax(-1) == dequantized.argmax(-1)).float().mean().item() >= 0.75


async def read_then_close(engine, prompt: list[int], after: int, params) -> None:
    """Streams a request and closes its stream (an abort) once `after` tokens came."""
    stream = engine.generate(prompt, params)
    got = 0
    async for out in stream:
        got += len(out.delta_token_ids)
        if got >= after:
            break
    await stream.aclose()
