"""The sampler on hand-made logits: filters, penalties, seeds, log-probabilities."""
import math

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
