"""Token sampling for a batch of rows, each with its own parameters.

Order: penalties and logit bias → temperature → top-k → top-p → min-p → draw. Log-probabilities reported
to users are those of the model's raw distribution (before penalties and temperature).
Each request draws one uniform number per step from its own torch.Generator, so a seeded
request gives the same tokens whatever else shares its batch; the token is found by inverse
transform on the device (no copy of the distribution to the host, and no sort of the whole
vocabulary unless a top-p nucleus is wider than NUCLEUS_CANDIDATES tokens).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ktengine.request import Sequence

log = logging.getLogger(__name__)


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
            # a tiny penalty must not overflow a logit to inf (softmax would give NaN)
            big = torch.finfo(logits.dtype).max / 4
            logits[row, seen] = torch.where(vals > 0, (vals / p.repetition_penalty).clamp(max=big),
                                            vals * p.repetition_penalty)
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


@dataclass(frozen=True)
class _Plan:
    """How a set of sampled rows is drawn (host-side facts only; hashable: it keys graphs)."""

    whole: tuple[int, ...]  # rows not truncated by rank: the whole vocabulary, no sort
    cut: tuple[int, ...]  # rows truncated by top-k or top-p: among the k most likely
    maybe: tuple[int, ...]  # positions in `cut` of rows without top-k: their nucleus may be wider
    k: int
    whole_min_p: bool  # a `whole` row has min-p


def _plan(params: list, vocab: int) -> _Plan:
    whole = tuple(i for i, p in enumerate(params) if not 0 < p.top_k < vocab and p.top_p >= 1.0)
    cut = tuple(sorted(set(range(len(params))) - set(whole)))
    k = min(vocab, max([NUCLEUS_CANDIDATES] + [params[i].top_k for i in cut if 0 < params[i].top_k < vocab]))
    maybe = tuple(j for j, i in enumerate(cut) if not 0 < params[i].top_k < vocab) if k < vocab else ()
    return _Plan(whole, cut, maybe, k, any(params[i].min_p > 0 for i in whole))


def _values(seqs: list[Sequence], plan: _Plan, vocab: int) -> list[float]:
    """Every per-row number a draw needs, in one list (one copy to the device): each row's
    uniform number (drawn here from its own generator), temperature and min-p; the cut rows'
    top-k and top-p; the row indices of the plan."""
    params = [s.params for s in seqs]
    u = [torch.rand((), generator=s.generator, dtype=torch.float64).item() for s in seqs]
    cut = [params[i] for i in plan.cut]
    return (u + [p.temperature for p in params] + [p.min_p for p in params]
            + [p.top_k if 0 < p.top_k < vocab else vocab for p in cut] + [p.top_p for p in cut]
            + list(plan.whole) + list(plan.cut) + list(plan.maybe))


def _draw_planned(logits: torch.Tensor, vals: torch.Tensor, plan: _Plan, sync: bool) -> torch.Tensor:
    """The tokens [R] of `plan` given `vals` (float64 on the logits' device, laid out by
    _values). sync=False: no wait for the device (and nothing that a CUDA graph could not
    capture): rows whose nucleus may be wider than the candidates are drawn both ways and
    the right draw kept on the device (the same tokens, more device work)."""
    R, vocab = logits.shape
    nw, nc, nm = len(plan.whole), len(plan.cut), len(plan.maybe)
    u, temp, min_p = vals[:R], vals[R:2 * R].float(), vals[2 * R:3 * R].float()
    at = 3 * R
    top_k, top_p = vals[at:at + nc].long(), vals[at + nc:at + 2 * nc].float()
    at += 2 * nc
    whole, cut, maybe = (vals[at:at + nw].long(), vals[at + nw:at + nw + nc].long(),
                         vals[at + nw + nc:at + nw + nc + nm].long())
    logits = logits.float() / temp[:, None]
    tokens = torch.empty(R, dtype=torch.int64, device=logits.device)
    if nw:  # no truncation by rank: the whole vocabulary, in its own order, no sort
        probs = torch.softmax(logits[whole], dim=-1)
        if plan.whole_min_p:
            top = probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < min_p[whole, None] * top, 0.0)
        tokens[whole] = _inverse_cdf(probs, u[whole])
    if nc:
        got, decided = _draw_candidates(logits[cut], top_k, top_p, min_p[cut], u[cut], plan.k)
        if plan.k < vocab and sync and not bool(decided.all()):  # a nucleus wider than k: sort those rows whole
            again = (~decided).nonzero()[:, 0]
            got[again], _ = _draw_candidates(logits[cut[again]], top_k[again], top_p[again],
                                             min_p[cut[again]], u[cut[again]], vocab)
        elif nm and not sync:  # rows not truncated by top-k may need the whole sort
            whole_sort, _ = _draw_candidates(logits[cut[maybe]], top_k[maybe], top_p[maybe],
                                             min_p[cut[maybe]], u[cut[maybe]], vocab)
            got[maybe] = torch.where(decided[maybe], got[maybe], whole_sort)
        tokens[cut] = got
    return tokens


def _draw(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token per row [R] from the row's distribution after temperature, top-k, top-p and
    min-p, by inverse transform with a uniform number from the row's own generator (so a
    seeded request draws the same tokens whatever shares its batch); may wait for the device."""
    plan = _plan([s.params for s in seqs], logits.shape[1])
    vals = _on(logits.device, _values(seqs, plan, logits.shape[1]), torch.float64)
    return _draw_planned(logits, vals, plan, sync=True)


def sample_on_device(logits: torch.Tensor, seqs: list[Sequence], out: torch.Tensor,
                     sampler: DeviceSampler | None = None) -> None:
    """Writes each sampled row's token into out [R] (which holds every row's argmax already),
    without waiting for the device: the rows that are not greedy draw theirs. Every request
    must be drawn_on_device; the tokens are those sample() would give. `sampler` replays
    captured draws (CUDA) instead of launching each operation."""
    if sampler is not None:
        sampler.draw(logits, seqs, out)
        return
    job = _sampled_rows(logits, seqs)
    if job is not None:
        plan, values, n = job
        _draw_rows(logits, _on(logits.device, values, torch.float64), plan, n, out)


def _sampled_rows(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[_Plan, list[float], int] | None:
    """The plan of the rows that are not greedy, their numbers (_values, then the rows'
    positions) and how many they are; None if every row is greedy."""
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if not rows:
        return None
    sub = [seqs[i] for i in rows]
    plan = _plan([s.params for s in sub], logits.shape[1])
    return plan, _values(sub, plan, logits.shape[1]) + rows, len(rows)


def _draw_rows(logits: torch.Tensor, vals: torch.Tensor, plan: _Plan, n: int, out: torch.Tensor) -> None:
    """out[rows] = the draw of `plan`, rows being the last n of vals (_sampled_rows' layout)."""
    rows = vals[-n:].long()
    out[rows] = _draw_planned(logits[rows], vals, plan, sync=False)


class DeviceSampler:
    """sample_on_device for the steps of CUDA graphs, in a CUDA graph of its own.

    Drawing launches about a hundred small operations (on the H200 box 3-4 ms of host time
    per step at batch 1, more than a whole decode step with most experts on the GPU). Once
    the same rows have been drawn the same way (plan, row positions, logits and output
    buffers) `capture_after` steps in a row (a capture costs about as much as a few eager
    draws), the draw is captured; each later step copies its numbers (one pinned copy) and
    replays it. The replay runs the same kernels on the same inputs, so the tokens are those
    of the eager draw. Without CUDA it draws eagerly.
    """

    RING = 4  # pinned value buffers in turn: a step's copy may still be queued behind its graph
    CAPTURE_AFTER = 8

    def __init__(self, device: torch.device, capture_after: int | None = None, max_graphs: int = 32) -> None:
        self.device = device
        self.capture_after = capture_after or self.CAPTURE_AFTER
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, tuple] = {}  # key -> (graph, static values)
        self.captures = 0
        self._last, self._streak = None, 0
        self._pool = None
        self._ring: list[torch.Tensor] = []
        self._events: list = []
        self._turn = 0

    def draw(self, logits: torch.Tensor, seqs: list[Sequence], out: torch.Tensor) -> None:
        if self.device.type != "cuda":
            sample_on_device(logits, seqs, out)
            return
        job = _sampled_rows(logits, seqs)
        if job is None:
            return
        plan, values, n = job
        key = (plan, tuple(values[-n:]), logits.data_ptr(), logits.shape, out.data_ptr())
        self._streak = self._streak + 1 if key == self._last else 1
        self._last = key
        entry = self.graphs.get(key)
        if entry is None and self._streak >= self.capture_after:
            try:
                entry = self._capture(key, logits, plan, n, out, len(values))
            except RuntimeError as e:  # draw eagerly from now on
                log.warning("sampled rows stay eager: capturing their draw failed (%s)", e)
                self.capture_after = float("inf")
        vals = entry[1] if entry is not None else torch.empty(len(values), dtype=torch.float64,
                                                                  device=self.device)
        self._stage(values, vals)
        if entry is not None:
            entry[0].replay()
        else:
            _draw_rows(logits, vals, plan, n, out)

    def _stage(self, values: list[float], dst: torch.Tensor) -> None:
        """values -> dst (device) through the next pinned buffer of the ring, without a wait
        for the device (unless that buffer's last copy has not run yet)."""
        if not self._ring or self._ring[0].numel() < len(values):
            for ev in self._events:
                ev.synchronize()
            size = max(len(values), 2 * (self._ring[0].numel() if self._ring else 32))
            self._ring = [torch.empty(size, dtype=torch.float64).pin_memory() for _ in range(self.RING)]
            self._events = [torch.cuda.Event() for _ in range(self.RING)]
            self._turn = 0
        j = self._turn
        self._turn = (j + 1) % self.RING
        self._events[j].synchronize()  # its copy of RING steps ago has run
        buf = self._ring[j][:len(values)]
        buf.copy_(torch.tensor(values, dtype=torch.float64))
        dst.copy_(buf, non_blocking=True)
        self._events[j].record()

    def _capture(self, key, logits, plan: _Plan, n: int, out: torch.Tensor, size: int):
        if len(self.graphs) >= self.max_graphs:
            self.graphs.pop(next(iter(self.graphs)))  # the oldest
        vals = torch.zeros(size, dtype=torch.float64, device=self.device)
        vals[-n:] = torch.arange(n, dtype=torch.float64, device=self.device)  # valid rows to warm with
        graph = torch.cuda.CUDAGraph()
        # the eager draws of the last steps were the warm-up (same plan, same shapes). Not
        # torch.cuda.graph(): it would wait for the steps in flight and collect garbage first.
        # The graphs share one memory pool: they run one at a time on one stream, and keep
        # nothing in it between replays (the tokens go to `out`).
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                _draw_rows(logits, vals, plan, n, out)
            finally:
                graph.capture_end()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = graph.pool()
        self.graphs[key] = (graph, vals)
        self.captures += 1
        return self.graphs[key]


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
