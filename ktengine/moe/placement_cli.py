"""`ktengine placement`: print the GPU expert placement without loading any weights."""
from __future__ import annotations

import argparse
import json

from ktengine.config import EngineConfig
from ktengine.model.loader import load_model_config
from ktengine.moe.placement import gpu_expert_mask, validate
from ktengine.startup import resolve_model_dir


def print_placement(args: argparse.Namespace, config: EngineConfig) -> int:
    validate(config.placement)
    model_dir, _ = resolve_model_dir(config.model)
    model = load_model_config(model_dir, config.dtype)
    mask = gpu_expert_mask(config.placement, model)
    gpu_experts = [row.nonzero().flatten().tolist() for row in mask]
    gpu_bytes = int(mask.sum().item()) * model.expert_nbytes
    if args.json:
        print(json.dumps({"num_layers": model.num_moe_layers, "num_experts": model.num_experts,
                          "gpu_experts": gpu_experts, "gpu_bytes": gpu_bytes}))
        return 0
    print(f"{model.num_moe_layers} MoE layers × {model.num_experts} experts; "
          f"{int(mask.sum())} on the GPU ({gpu_bytes / 2**30:.2f} GiB of expert weights)")
    for layer_id, ids in zip(model.moe_layer_ids, gpu_experts):
        print(f"layer {layer_id:3d}: {len(ids):3d} GPU experts {ids}")
    return 0
