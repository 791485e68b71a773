"""The one torch reference of the fused MoE that every kernel test uses (fp32 throughout)."""
from __future__ import annotations

import torch


def fused_moe_reference(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                        down: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        gpu_mask_row: torch.Tensor | None = None,
                        act_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out[t] = sum_j w[t,j] * down_e(silu(gate_e x_t) * up_e x_t) over CPU-resident e.

    x [T, H]; gate, up [E, I, H]; down [E, H, I]; topk_ids, topk_weights [T, k];
    gpu_mask_row bool [E] (True: the expert is on the GPU and contributes nothing here);
    act_dtype: silu(g) * u is rounded to it before `down` (a kernel that stores it in bf16).
    Returns fp32 [T, H] on x's device.
    """
    x = x.float()
    gate, up, down = gate.float(), up.float(), down.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(topk_ids).tolist():
        if e < 0 or e >= gate.shape[0] or (gpu_mask_row is not None and bool(gpu_mask_row[e])):
            continue
        tokens, slots = torch.nonzero(topk_ids == e, as_tuple=True)
        xe = x[tokens]                                                   # [n, H]
        act = torch.nn.functional.silu(xe @ gate[e].T) * (xe @ up[e].T)  # [n, I]
        act = act.to(act_dtype).float()
        ye = act @ down[e].T                                             # [n, H]
        out.index_add_(0, tokens, ye * topk_weights[tokens, slots].float()[:, None])
    return out
