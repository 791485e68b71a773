"""Token sampling for a batch of rows, each with its own parameters.

Order: penalties and logit bias → temperature → top-k → top-p → min-p → draw. Log-probabilities reported
to users are those of the model's raw distribution (before penalties and temperature).
Each request draws one uniform number per step from its own torch.Generator, so a seeded
request gives the same tokens whatever else shares its batch; the token is found by inverse
transform on the device (no copy of the distribution to the host, and no sort of the whole
vocabulary unless a top-p nucleus is wider than NUCLEUS_CANDIDATES tokens).
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


def argmax_suffices(p) -> bool:
    """True if a request's token is its row's argmax, with nothing else to report: greedy, no
    penalties or bias, no log-probs."""
    return p.greedy and p.logprobs is None and not _has_penalties(p)


def drawn_on_device(p) -> bool:
    """True if a request's token can be drawn without the host seeing the logits or its
    output so far (sample_on_device): no penalties or bias, no log-probs."""
    return p.logprobs is None and not _has_penalties(p)


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


def _on(device: torch.device, values: list, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a tensor on `device` without waiting for the device: torch's
    ordinary host-to-CUDA copy synchronizes the stream (it would wait for the steps in
    flight), a copy from pinned memory does not."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


# rows truncated by top-p alone look for their nucleus among this many most likely tokens
# first (one partial top-k instead of a sort of the whole vocabulary); a row whose nucleus is
# wider is drawn again from the full sort
NUCLEUS_CANDIDATES = 1024


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the index i with cum(probs)[i-1] <= u * total < cum(probs)[i]: a draw from
    the row's (unnormalized, nonnegative) probabilities given a uniform u [R] float64 in
    [0, 1); never an index of probability 0."""
    cum = probs.double().cumsum(dim=-1)
    target = (u * cum[:, -1])[:, None]
    return torch.searchsorted(cum, target, right=True)[:, 0].clamp_(max=probs.shape[1] - 1)


def _draw_candidates(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     min_p: torch.Tensor, u: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [R] drawn among each row's k most likely (logits already divided by the
    temperature), and which rows that decides [R]: those truncated by top-k, and those whose
    top-p nucleus lies within the k (a token outside it has at least their mass before it)."""
    vocab = logits.shape[1]
    vals, ids = torch.topk(logits, k, dim=-1)  # most likely first
    full = torch.exp(vals - torch.logsumexp(logits, dim=-1, keepdim=True))  # of the whole row
    rank = torch.arange(k, device=logits.device)[None, :]
    probs = full.masked_fill(rank >= top_k[:, None], 0.0)
    by_k = top_k < vocab
    probs = probs / torch.where(by_k, probs.sum(dim=-1), 1.0)[:, None]  # top-k: renormalized
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
    drop = (before >= top_p[:, None]) | (probs < min_p[:, None] * probs[:, :1])
    drop[:, 0] = False  # the most likely token always survives
    probs = probs.masked_fill(drop, 0.0)
    decided = by_k | (full.sum(dim=-1) >= top_p) if k < vocab else torch.ones_like(by_k)
    return ids.gather(1, _inverse_cdf(probs, u)[:, None])[:, 0], decided


def _draw(logits: torch.Tensor, seqs: list[Sequence], sync: bool = True) -> torch.Tensor:
    """One token per row [R] from the row's distribution after temperature, top-k, top-p and
    min-p, by inverse transform with a uniform number from the row's own generator (so a
    seeded request draws the same tokens whatever shares its batch). sync=False: no wait for
    the device; rows whose nucleus may be wider than the candidates are drawn both ways and
    the right draw kept on the device (the same tokens, more device work)."""
    device, vocab = logits.device, logits.shape[1]
    params = [s.params for s in seqs]
    u = _on(device, [torch.rand((), generator=s.generator, dtype=torch.float64).item() for s in seqs],
            torch.float64)
    temp = _on(device, [p.temperature for p in params])
    logits = logits.float() / temp[:, None]
    min_p = _on(device, [p.min_p for p in params])
    tokens = torch.empty(len(seqs), dtype=torch.int64, device=device)
    whole = [i for i, p in enumerate(params) if not 0 < p.top_k < vocab and p.top_p >= 1.0]
    if whole:  # no truncation by rank: the whole vocabulary, in its own order, no sort
        rows = _on(device, whole)
        probs = torch.softmax(logits[rows], dim=-1)
        if any(params[i].min_p > 0 for i in whole):
            top = probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < min_p[rows, None] * top, 0.0)
        tokens[rows] = _inverse_cdf(probs, u[rows])
    cut = sorted(set(range(len(seqs))) - set(whole))
    if cut:
        rows = _on(device, cut)
        top_k = _on(device, [params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in cut])
        top_p = _on(device, [params[i].top_p for i in cut])
        k = min(vocab, max([NUCLEUS_CANDIDATES] + [params[i].top_k for i in cut if 0 < params[i].top_k < vocab]))
        got, decided = _draw_candidates(logits[rows], top_k, top_p, min_p[rows], u[rows], k)
        if k < vocab and sync and not bool(decided.all()):  # a nucleus wider than k: sort those rows whole
            again = (~decided).nonzero()[:, 0]
            got[again], _ = _draw_candidates(logits[rows[again]], top_k[again], top_p[again],
                                             min_p[rows[again]], u[rows[again]], vocab)
        elif k < vocab and not sync:  # rows not truncated by top-k may need the whole sort
            maybe = [j for j, i in enumerate(cut) if not 0 < params[i].top_k < vocab]
            if maybe:
                again = _on(device, maybe)
                whole_sort, _ = _draw_candidates(logits[rows[again]], top_k[again], top_p[again],
                                                 min_p[rows[again]], u[rows[again]], vocab)
                got[again] = torch.where(decided[again], got[again], whole_sort)
        tokens[rows] = got
    return tokens


def sample_on_device(logits: torch.Tensor, seqs: list[Sequence], out: torch.Tensor) -> None:
    """Writes each sampled row's token into out [R] (which holds every row's argmax already),
    without waiting for the device: the rows that are not greedy draw theirs. Every request
    must be drawn_on_device; the tokens are those sample() would give."""
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if random_rows:
        rows = _on(logits.device, random_rows)
        out[rows] = _draw(logits[rows], [seqs[i] for i in random_rows], sync=False)


def sample(logits: torch.Tensor, seqs: list[Sequence], argmax: list[int] | None = None) -> SampleResult:
    """logits [B, vocab] float32, one row per sequence; returns the chosen tokens. argmax: each
    row's argmax already computed (a decode graph's), used when every row is greedy with no
    penalties or log-probs, so that such a step costs no device work here."""
    want_logprobs = any(s.params.logprobs is not None for s in seqs)
    if argmax is not None and all(argmax_suffices(s.params) for s in seqs):
        return SampleResult(list(argmax), [None] * len(seqs), [None] * len(seqs))
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    work = logits
    if any(_has_penalties(s.params) for s in seqs):
        work = logits.clone()
        _apply_penalties(work, seqs)
    chosen = torch.argmax(work, dim=-1)
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=chosen.device)
        chosen[rows] = _draw(work[rows], [seqs[i] for i in random_rows])
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
