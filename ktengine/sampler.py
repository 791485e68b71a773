"""Token sampling for a batch of rows, each with its own parameters.

Order: penalties and logit bias → temperature → top-k → top-p → min-p → draw. Log-probabilities reported
to users are those of the model's raw distribution (before penalties and temperature).
Each request draws from its own torch.Generator, so a seeded request gives the same tokens
whatever else shares its batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ktengine.request import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float | None]  # None where the request asked for no log-probs
    top_logprobs: list[dict[int, float] | None]


def _has_penalties(p) -> bool:
    return (p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)
            or bool(p.logit_bias))


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.prompt_token_ids) | set(seq.output_token_ids)),
                                dtype=torch.long, device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
            bias = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
            logits[row, ids] += bias


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p (rows: sampled sequences)."""
    device, vocab = logits.device, logits.shape[1]
    temp = torch.tensor([s.params.temperature for s in seqs], device=device)
    logits = logits / temp[:, None]
    top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else vocab for s in seqs], device=device)
    top_p = torch.tensor([s.params.top_p for s in seqs], device=device)
    min_p = torch.tensor([s.params.min_p for s in seqs], device=device)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(vocab, device=device)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
    drop = (before >= top_p[:, None]) | (probs < min_p[:, None] * probs[:, :1])
    drop[:, 0] = False  # the most likely token always survives
    probs = probs.masked_fill(drop, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, order, probs)


def sample(logits: torch.Tensor, seqs: list[Sequence], argmax: list[int] | None = None) -> SampleResult:
    """logits [B, vocab] float32, one row per sequence; returns the chosen tokens. argmax: each
    row's argmax already computed (a decode graph's), used when every row is greedy with no
    penalties or log-probs, so that such a step costs no device work here."""
    want_logprobs = any(s.params.logprobs is not None for s in seqs)
    if (argmax is not None and not want_logprobs
            and all(s.params.greedy and not _has_penalties(s.params) for s in seqs)):
        return SampleResult(list(argmax), [None] * len(seqs), [None] * len(seqs))
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    work = logits
    if any(_has_penalties(s.params) for s in seqs):
        work = logits.clone()
        _apply_penalties(work, seqs)
    chosen = torch.argmax(work, dim=-1)
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if random_rows:
        probs = _filtered_probs(work[random_rows], [seqs[i] for i in random_rows]).cpu()
        for j, row in enumerate(random_rows):
            chosen[row] = torch.multinomial(probs[j], 1, generator=seqs[row].generator).item()
    if raw_logprobs is None:  # nobody asked: no pass over the vocabulary for them
        token_ids = chosen.tolist()
        return SampleResult(token_ids, [None] * len(seqs), [None] * len(seqs))
    picked = raw_logprobs.gather(1, chosen[:, None])[:, 0]
    # one device-to-host copy for both (token ids are exact in float64)
    ids_f, picked = torch.stack((chosen.double(), picked.double())).tolist()
    token_ids = [int(t) for t in ids_f]
    top: list[dict[int, float] | None] = [None] * len(seqs)
    want = [s.params.logprobs or 0 for s in seqs]
    if max(want, default=0) > 0:
        vals, ids = torch.topk(raw_logprobs, max(want), dim=-1)
        vals, ids = vals.tolist(), ids.tolist()
        for i, n in enumerate(want):
            if n:
                top[i] = dict(zip(ids[i][:n], vals[i][:n]))
    return SampleResult(token_ids, picked, top)
