"""Gated DeltaNet: Qwen3-Next's linear-attention token mixer, in plain torch.

Per sequence the layer keeps a recurrent state instead of K/V entries: the last K-1 inputs of
a depthwise causal convolution over [q, k, v], and the delta-rule state S [value_heads,
key_head_dim, value_head_dim]. For each token t (per head, after the convolution):

    S ← exp(g_t) · S;   S ← S + β_t · k_t ⊗ (v_t − Sᵀk_t);   o_t = Sᵀ q_t / √d_k

with q, k L2-normalised. Decode tokens run that recurrence directly, batched over sequences;
a prefill chunk runs the chunked (UT-transform) form that computes the same thing with matrix
products, one sequence at a time. Both mirror transformers' torch fallbacks operation for
operation (fp32 inside), so results match it to rounding, and a prefill split into chunks
equals one pass because every chunk starts from the state the previous one left.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ktengine.config import ModelConfig
from ktengine.model.layers import Linear, activation, empty_param


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _expand_heads(
    q: torch.Tensor, k: torch.Tensor, num_v_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each q/k head serves num_v_heads // num_k_heads consecutive value heads."""
    if q.shape[-2] != num_v_heads:
        rep = num_v_heads // q.shape[-2]
        q, k = q.repeat_interleave(rep, dim=-2), k.repeat_interleave(rep, dim=-2)
    return q, k


def chunk_gated_delta_rule(
    q: torch.Tensor,  # [T, Hk, Dk]
    k: torch.Tensor,  # [T, Hk, Dk]
    v: torch.Tensor,  # [T, Hv, Dv]
    g: torch.Tensor,  # [T, Hv] log decay (<= 0)
    beta: torch.Tensor,  # [T, Hv]
    initial_state: torch.Tensor | None,  # [Hv, Dk, Dv] fp32; None = zeros
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's outputs [T, Hv, Dv] (dtype of q) and its final state [Hv, Dk, Dv] fp32."""
    dtype, seq_len = q.dtype, q.shape[0]
    q, k = _expand_heads(q, k, v.shape[1])
    # [H, T, ...] in fp32
    q, k, v, beta, g = (
        x.transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)
        for x in (q, k, v, beta, g)
    )
    q, k = l2norm(q), l2norm(k)
    q = q * q.shape[-1] ** -0.5
    pad = (chunk_size - seq_len % chunk_size) % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    heads, num_chunks = v.shape[0], (seq_len + pad) // chunk_size
    v_beta, k_beta = v * beta.unsqueeze(-1), k * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = (
        x.reshape(heads, num_chunks, chunk_size, x.shape[-1]) for x in (q, k, k_beta, v_beta)
    )
    g = g.reshape(heads, num_chunks, chunk_size)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    cum = g.cumsum(dim=-1)  # [H, n, C] log decay from the chunk start
    pair = (
        (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()
    )  # [H, n, C, C]
    ut_system = (k_beta @ k.transpose(-1, -2)) * pair
    intra = (q @ k.transpose(-1, -2)) * pair
    decayed_k_beta = k_beta * cum.exp().unsqueeze(-1)
    new_values = torch.linalg.solve_triangular(ut_system, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(
        ut_system, decayed_k_beta, upper=False, unitriangular=True
    )
    if initial_state is None:
        state = torch.zeros(heads, k.shape[-1], v.shape[-1], dtype=torch.float32, device=q.device)
    else:
        state = initial_state.to(torch.float32)
    out = torch.zeros_like(new_values)
    q = q * cum.exp().unsqueeze(-1)
    k = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()[..., None, None]  # [H, n, 1, 1]
    for i in range(num_chunks):
        v_new = new_values[:, i] - k_cumdecay[:, i] @ state
        out[:, i] = q[:, i] @ state + intra[:, i] @ v_new
        state = state * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ v_new
    out = out.reshape(heads, -1, out.shape[-1])[:, :seq_len]
    return out.transpose(0, 1).to(dtype, memory_format=torch.contiguous_format), state


def recurrent_gated_delta_rule(
    q: torch.Tensor,  # [B, Hk, Dk] one token of each of B sequences
    k: torch.Tensor,  # [B, Hk, Dk]
    v: torch.Tensor,  # [B, Hv, Dv]
    g: torch.Tensor,  # [B, Hv]
    beta: torch.Tensor,  # [B, Hv]
    state: torch.Tensor,  # [B, Hv, Dk, Dv] fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs [B, Hv, Dv] (dtype of q) and the updated states [B, Hv, Dk, Dv] fp32."""
    dtype = q.dtype
    q, k = _expand_heads(q, k, v.shape[1])
    q, k, v, beta, g = (x.to(torch.float32) for x in (q, k, v, beta, g))
    q, k = l2norm(q), l2norm(k)
    q = q / (q.shape[-1] ** 0.5)
    state = state.to(torch.float32) * g.exp()[..., None, None]
    kv_mem = (state * k.unsqueeze(-1)).sum(dim=-2)  # [B, Hv, Dv]
    delta = (v - kv_mem) * beta.unsqueeze(-1)
    state = state + k.unsqueeze(-1) * delta.unsqueeze(-2)
    out = (state * q.unsqueeze(-1)).sum(dim=-2)
    return out.to(dtype), state


class CausalConv1d(torch.nn.Module):
    """Depthwise causal convolution that carries its last K-1 inputs between calls."""

    def __init__(self, channels: int, kernel_size: int, act: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_param(channels, 1, kernel_size, dtype=dtype)  # checkpoint layout
        self.act = activation(act)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, T] new inputs; state [B, C, K-1] the inputs before them (zeros at the start).
        Returns act(conv) [B, C, T] in x's dtype and the new state [B, C, K-1]."""
        full = torch.cat([state.to(x.dtype), x], dim=-1).to(self.weight.dtype)
        out = F.conv1d(full, self.weight, None, padding=0, groups=x.shape[1])
        return self.act(out).to(x.dtype), full[..., x.shape[-1] :]


class GatedRMSNorm(torch.nn.Module):
    """RMSNorm over each head's output, then scaled by silu(z) (norm before gate)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = empty_param(size, dtype=dtype)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf.to(dtype) * F.silu(gate.float())).to(dtype)


class GatedDeltaNet(torch.nn.Module):
    """One linear-attention layer over the step's flat tokens and the per-request state pool."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        lin, dt = config.linear_attention, config.dtype
        assert lin is not None
        self.layer_id = layer_id
        self.num_k_heads, self.num_v_heads = lin.num_key_heads, lin.num_value_heads
        self.head_k_dim, self.head_v_dim = lin.key_head_dim, lin.value_head_dim
        self.key_dim, self.value_dim = lin.key_dim, lin.value_dim
        self.in_proj_qkvz = Linear(
            config.hidden_size, 2 * lin.key_dim + 2 * lin.value_dim, False, dt
        )
        self.in_proj_ba = Linear(config.hidden_size, 2 * lin.num_value_heads, False, dt)
        self.conv1d = CausalConv1d(lin.conv_dim, lin.conv_kernel_size, config.hidden_act, dt)
        self.dt_bias = empty_param(lin.num_value_heads, dtype=dt)
        self.A_log = empty_param(lin.num_value_heads, dtype=dt)
        self.norm = GatedRMSNorm(lin.value_head_dim, config.rms_norm_eps, dt)
        self.out_proj = Linear(lin.value_dim, config.hidden_size, False, dt)

    def _split(self, x: torch.Tensor):
        """The projections, grouped per key head in the checkpoint, as q, k, v, z, b, a."""
        n, hk, r = x.shape[0], self.num_k_heads, self.num_v_heads // self.num_k_heads
        dk, dv = self.head_k_dim, self.head_v_dim
        qkvz = self.in_proj_qkvz(x).view(n, hk, 2 * dk + 2 * r * dv)
        q, k, v, z = torch.split(qkvz, [dk, dk, r * dv, r * dv], dim=-1)
        b, a = torch.split(self.in_proj_ba(x).view(n, hk, 2 * r), [r, r], dim=-1)
        return q, k, v.reshape(n, -1, dv), z.reshape(n, -1, dv), b.reshape(n, -1), a.reshape(n, -1)

    def _qkv(self, mixed: torch.Tensor):
        """Convolved [T, conv_dim] → q, k [T, Hk, Dk], v [T, Hv, Dv]."""
        q, k, v = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        t = mixed.shape[0]
        return (
            q.reshape(t, -1, self.head_k_dim),
            k.reshape(t, -1, self.head_k_dim),
            v.reshape(t, -1, self.head_v_dim),
        )

    def forward(
        self, x: torch.Tensor, meta, cache: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """x [N, hidden]; cache: conv states [slots, C, K-1], delta-rule states
        [slots, Hv, Dk, Dv]."""
        n = x.shape[0]
        q, k, v, z, b, a = self._split(x)
        mixed = torch.cat([q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1)], dim=-1)  # [N, C]
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # [N, Hv]
        conv_cache, rec_cache = cache
        core = torch.empty(n, self.num_v_heads, self.head_v_dim, dtype=x.dtype, device=x.device)
        st = meta.state
        if st.decode_rows.numel():  # single-token sequences: one batched recurrent step
            rows, slots, has = st.decode_rows, st.decode_slots, st.decode_has_state
            conv_state = torch.where(has[:, None, None], conv_cache[slots], 0)
            y, conv_state = self.conv1d(mixed[rows].unsqueeze(-1), conv_state)
            conv_cache[slots] = conv_state.to(conv_cache.dtype)
            init = torch.where(has[:, None, None, None], rec_cache[slots], 0)
            out, state = recurrent_gated_delta_rule(
                *self._qkv(y[..., 0]), g[rows], beta[rows], init
            )
            rec_cache[slots] = state
            core[rows] = out
        for row, num, slot, has_state in st.prefills:  # prefill chunks: the chunked form
            end = row + num
            if has_state:
                conv_state, init = conv_cache[slot : slot + 1], rec_cache[slot]
            else:
                conv_state, init = torch.zeros_like(conv_cache[slot : slot + 1]), None
            y, conv_state = self.conv1d(mixed[row:end].T.unsqueeze(0), conv_state)
            conv_cache[slot] = conv_state[0].to(conv_cache.dtype)
            out, state = chunk_gated_delta_rule(*self._qkv(y[0].T), g[row:end], beta[row:end], init)
            rec_cache[slot] = state
            core[row:end] = out
        core = self.norm(core.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(core.view(n, -1))
