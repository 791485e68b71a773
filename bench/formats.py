"""Accuracy cost of each CPU expert weight format, end to end, against the exact path.

    python bench/formats.py [--model DIR | --preset medium] [--tokens 256] [--json]

Every routed expert runs on the CPU kernels in the format asked for; the reference is the
same model on its exact path (the checkpoint's own dtype). Over the positions of a few
prompts it reports the next-token KL divergence from the reference, top-1 agreement, and
the logits' largest difference relative to their scale. Never asserts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch

from ktengine.config import EngineConfig, MoEConfig, WeightFormat
from ktengine.kv_cache import slots_of
from ktengine.model.attention import AttentionMetadata, build_group
from ktengine.startup import load


def logits_of(loaded, ids: list[int]) -> torch.Tensor:
    kv = loaded.kv_cache
    blocks = kv.allocator.allocate(-(-len(ids) // kv.allocator.block_size))
    try:
        slots = slots_of(blocks, kv.allocator.block_size, 0, len(ids))
        meta = AttentionMetadata(
            positions=torch.arange(len(ids), device=loaded.device),
            slot_mapping=torch.tensor(slots, device=loaded.device),
            groups=[build_group([0], [len(ids)], [0], [slots], None, loaded.device)])
        return loaded.model(torch.tensor(ids, device=loaded.device), meta, kv.layers).float().cpu()
    finally:
        kv.allocator.free(blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--preset", default=None)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = args.model
    if args.preset:
        from models import RoutingProfile, write_random_checkpoint

        model = str(write_random_checkpoint(Path("/tmp") / f"ktengine-bench-{args.preset}", args.preset,
                                            profile=RoutingProfile()))
    g = torch.Generator().manual_seed(0)
    results = {}
    ref = None
    for fmt in (WeightFormat.AUTO, WeightFormat.BF16, WeightFormat.INT8, WeightFormat.INT4):
        loaded = load(EngineConfig(model=model, moe=MoEConfig(weight_format=fmt)), progress=False)
        vocab = loaded.model_config.vocab_size
        if ref is None:
            prompts = [torch.randint(3, vocab, (args.tokens,), generator=g).tolist() for _ in range(args.prompts)]
        out = torch.cat([logits_of(loaded, p) for p in prompts])
        loaded.close()
        if ref is None:
            ref = out
            continue
        logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        results[fmt.value] = {
            "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "top1_agreement": (ref.argmax(-1) == out.argmax(-1)).float().mean().item(),
            "max_abs_logit_diff_rel": ((out - ref).abs().max() / ref.abs().max()).item(),
        }
    report = {"model": model or "demo", "positions": args.prompts * args.tokens,
              "reference": "exact path (checkpoint dtype)", "formats": results}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['model']}: {report['positions']} positions vs the exact path")
    print(f"{'format':>6} {'KL mean':>10} {'KL max':>10} {'top-1 agree':>12} {'max |dlogit|/scale':>19}")
    for fmt, r in results.items():
        print(f"{fmt:>6} {r['kl_mean']:>10.2e} {r['kl_max']:>10.2e} {r['top1_agreement']:>12.2%} "
              f"{r['max_abs_logit_diff_rel']:>19.3e}")


if __name__ == "__main__":
    main()
