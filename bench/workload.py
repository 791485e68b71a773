"""Request workloads for the benchmarks: a ShareGPT-like length mix over a routing profile.

ShareGPT conversations have long-tailed prompt and answer lengths (a few hundred tokens on
average, with tails into the thousands). We approximate that mix with clipped log-normal
draws (medians 200 and 250 tokens; an assumption, not a fit), scaled by `scale` for small
machines. Each
prompt's tokens come mostly (`focus`) from one token group of the routing profile (per-prompt
locality), the rest from anywhere.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int


def sharegpt_like(num: int, vocab: int, groups: int, seed: int = 0, scale: float = 1.0,
                  focus: float = 0.8, max_prompt: int = 2048, max_output: int = 1024) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        p_len = int(min(max_prompt, max(4, rng.lognormvariate(math.log(200 * scale), 0.9))))
        o_len = int(min(max_output, max(2, rng.lognormvariate(math.log(250 * scale), 0.8))))
        group = rng.randrange(groups)
        lo, hi = group * vocab // groups, (group + 1) * vocab // groups
        prompt = [rng.randrange(max(lo, 3), hi) if rng.random() < focus else rng.randrange(3, vocab)
                  for _ in range(p_len)]
        out.append(Request(prompt, o_len))
    return out
