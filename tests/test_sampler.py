"""The sampler on hand-made logits: filters, penalties, seeds, log-probabilities."""
import math

import pytest
import torch

from ktengine.request import SamplingParams, Sequence
from ktengine.sampler import sample


def _seqs(n, seed=0, **kw):
    out = []
    for i in range(n):
        s = Sequence(str(i), [1, 2, 3], SamplingParams(**kw))
        s.generator = torch.Generator().manual_seed(seed + i)
        out.append(s)
    return out


LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])


def test_greedy_and_logprobs():
    res = sample(LOGITS.clone(), _seqs(1, temperature=0.0, logprobs=2))
    assert res.token_ids == [0]
    assert math.isclose(res.logprobs[0], torch.log_softmax(LOGITS, -1)[0, 0].item(), rel_tol=1e-6)
    assert list(res.top_logprobs[0]) == [0, 1]


def test_filters_that_leave_one_token_are_greedy():
    for kw in ({"top_k": 1}, {"top_p": 0.01}, {"top_p": 0.0}, {"min_p": 0.99}):
        for seed in range(5):
            assert sample(LOGITS.clone(), _seqs(1, seed=seed, **kw)).token_ids == [0]


def test_top_k_limits_support_and_frequencies_follow_probabilities():
    seqs = _seqs(1, top_k=2)
    counts = [0, 0, 0, 0, 0]
    for _ in range(2000):
        counts[sample(LOGITS.clone(), seqs).token_ids[0]] += 1
    assert counts[2:] == [0, 0, 0]
    p0 = 1 / (1 + math.exp(-1.0))  # softmax over the two kept logits
    assert abs(counts[0] / 2000 - p0) < 0.04


def test_seeded_rows_do_not_depend_on_neighbours():
    a = _seqs(1, seed=7)
    alone = [sample(LOGITS.clone(), a).token_ids[0] for _ in range(20)]
    b = _seqs(1, seed=7)
    other = _seqs(1, seed=99)
    together = [sample(torch.cat([LOGITS, LOGITS]), other + b).token_ids[1] for _ in range(20)]
    assert alone == together


def test_penalties_push_away_repeated_tokens():
    seq = _seqs(1, temperature=0.0, frequency_penalty=2.0)[0]
    seq.output_token_ids = [0, 0]
    assert sample(LOGITS.clone(), [seq]).token_ids == [1]
    seq = _seqs(1, temperature=0.0, repetition_penalty=2.0)[0]
    seq.prompt_token_ids = [0]  # 2.0 / 2 = 1.0 ties with token 1; argmax picks the first
    logits = torch.tensor([[2.0, 1.5, 0.0, 0.0, 0.0]])
    assert sample(logits, [seq]).token_ids == [1]


def test_logit_bias_forces_and_bans_tokens_per_row():
    forced = _seqs(1, temperature=0.0, logit_bias={3: 100.0}, logprobs=0)[0]
    banned = _seqs(1, seed=5, logit_bias={0: -100.0, 1: -100.0})[0]
    plain = _seqs(1, temperature=0.0)[0]
    for _ in range(20):
        res = sample(torch.cat([LOGITS, LOGITS, LOGITS]), [forced, banned, plain])
        assert res.token_ids[0] == 3 and res.token_ids[1] not in (0, 1) and res.token_ids[2] == 0
    # the reported log-prob is the model's, before the bias
    assert math.isclose(res.logprobs[0], torch.log_softmax(LOGITS, -1)[0, 3].item(), rel_tol=1e-6)


def _reference_probs(logits, temperature, top_k, top_p, min_p):
    """The filtered distribution by its definition: sort, top-k, softmax, top-p on the mass
    strictly before each token, min-p against the most likely, renormalize."""
    x = logits / temperature
    vals, order = torch.sort(x, descending=True)
    if 0 < top_k < len(x):
        vals[top_k:] = float("-inf")
    p = torch.softmax(vals.double(), dim=-1)
    before = torch.cumsum(p, dim=-1) - p
    drop = (before >= top_p) | (p < min_p * p[0])
    drop[0] = False
    p[drop] = 0.0
    out = torch.zeros_like(p)
    out[order] = p / p.sum()
    return out



@pytest.mark.parametrize("kw", [
    {"temperature": 0.7},
    {"temperature": 1.0, "top_p": 0.9},
    {"temperature": 1.3, "top_k": 40, "top_p": 0.8},
    {"temperature": 1.0, "min_p": 0.05},
    {"temperature": 1.0, "top_p": 0.999},  # a nucleus wider than the candidates: full sort
    {"temperature": 0.5, "top_k": 3},
])
def test_draws_follow_the_filtered_distribution(kw, monkeypatch):
    import ktengine.sampler as sampler_module

    monkeypatch.setattr(sampler_module, "NUCLEUS_CANDIDATES", 16)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, generator=g) * 2.0
    n = 10000
    seqs = _seqs(n, seed=11, **kw)
    got = sample(logits.expand(n, -1).contiguous(), seqs).token_ids
    freq = torch.bincount(torch.tensor(got), minlength=300).double() / n
    p = _reference_probs(logits, kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1.0),
                         kw.get("min_p", 0.0))
    assert freq[p == 0].sum() == 0  # nothing outside the filtered support
    sigma = (p * (1 - p) / n).sqrt()
    assert bool(((freq - p).abs() <= 5 * sigma + 1e-3).all())


def test_drawing_on_the_device_gives_the_tokens_sample_gives(monkeypatch):
    """sample_on_device (a launched-ahead step's draw: no wait for the device) against
    sample() on the same logits and seeds: greedy rows keep the argmax already in place,
    sampled rows draw the same tokens, a nucleus wider than the candidates included."""
    import ktengine.sampler as sampler_module
    from ktengine.sampler import sample_on_device

    monkeypatch.setattr(sampler_module, "NUCLEUS_CANDIDATES", 16)
    kinds = [{"temperature": 0.0}, {"temperature": 0.7}, {"temperature": 1.0, "top_p": 0.9},
             {"temperature": 1.3, "top_k": 40, "top_p": 0.8}, {"temperature": 1.0, "min_p": 0.05},
             {"temperature": 1.0, "top_p": 0.999}, {"temperature": 0.5, "top_k": 3}]
    g = torch.Generator().manual_seed(5)
    for trial in range(20):
        logits = torch.randn(len(kinds), 300, generator=g) * (0.5 + trial / 5)

        def seqs(trial=trial):
            out = []
            for i, kw in enumerate(kinds):
                s = Sequence(str(i), [1], SamplingParams(**kw))
                s.generator = torch.Generator().manual_seed(100 * trial + i)
                out.append(s)
            return out

        want = sample(logits, seqs()).token_ids
        tokens = torch.argmax(logits, dim=-1)
        sample_on_device(logits, seqs(), tokens)
        assert tokens.tolist() == want


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_device_sampler_gives_the_tokens_sample_gives_step_after_step(device, monkeypatch):
    """DeviceSampler (launched steps' draws; on CUDA captured after a few steps of the same
    rows, then replayed) against sample(), step after step with new logits in the same
    buffers and each row's generator moving on; the batch changes midway (a new capture)."""
    import ktengine.sampler as sampler_module
    from ktengine.sampler import DeviceSampler

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(sampler_module, "NUCLEUS_CANDIDATES", 16)
    kinds = [{"temperature": 0.0}, {"temperature": 0.7}, {"temperature": 1.0, "top_p": 0.9},
             {"temperature": 1.3, "top_k": 40, "top_p": 0.8}, {"temperature": 1.0, "min_p": 0.05},
             {"temperature": 1.0, "top_p": 0.999}, {"temperature": 0.5, "top_k": 3}]

    def make(seed):
        out = []
        for i, kw in enumerate(kinds):
            s = Sequence(str(i), [1], SamplingParams(**kw))
            s.generator = torch.Generator().manual_seed(seed + i)
            out.append(s)
        return out

    sampler = DeviceSampler(torch.device(device), capture_after=2)
    logits = torch.empty(len(kinds), 300, device=device)
    tokens = torch.empty(len(kinds), dtype=torch.int64, device=device)
    mine, ref = make(7), make(7)
    g = torch.Generator().manual_seed(9)
    for step in range(12):
        if step == 6:  # another batch: row 1 leaves
            mine, ref = mine[:1] + mine[2:], ref[:1] + ref[2:]
        n = len(mine)
        host = torch.randn(n, 300, generator=g) * (0.5 + step / 4)
        logits[:n].copy_(host)
        want = sample(host, ref).token_ids
        tokens[:n].copy_(host.argmax(dim=-1))
        sampler.draw(logits[:n], mine, tokens[:n])
        assert tokens[:n].tolist() == want, step
    if device == "cuda":
        assert sampler.captures == 2
