"""What a request asks for (SamplingParams), its running state (Sequence), what it yields."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the client


class SamplingError(ValueError):
    """A sampling parameter out of range; `param` names it (for an OpenAI-style 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


GREEDY_BELOW = 1e-5  # a lower temperature samples greedily


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; n >= 0: the chosen token plus the n most likely
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (-100..100)

    def validate(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("temperature", 0.0 <= self.temperature <= 2.0, "must be between 0 and 2"),
            ("top_p", 0.0 <= self.top_p <= 1.0, "must be between 0 and 1"),  # 0: the top token
            ("top_k", self.top_k >= -1, "must be -1, 0 (off) or positive"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be between 0 and 1"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 2.0, "must be in (0, 2]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be between -2 and 2"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be between -2 and 2"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be between 0 and 20"),
            ("stop", len(self.stop) <= 16 and all(s for s in self.stop), "at most 16 non-empty strings"),
            ("seed", self.seed is None or -2**63 <= self.seed < 2**63, "must be a 64-bit integer"),
            ("stop_token_ids", len(self.stop_token_ids) <= 1024
             and all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "holds at most 1024 token ids (>= 0)"),
            ("logit_bias", not self.logit_bias or (
                len(self.logit_bias) <= 1024
                and all(isinstance(t, int) and t >= 0 and -100.0 <= b <= 100.0
                        for t, b in self.logit_bias.items())),
             "maps at most 1024 token ids (>= 0) to biases between -100 and 100"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise SamplingError(param, f"{param} {message}")

    @property
    def greedy(self) -> bool:
        """The row's argmax: temperature 0 (or below GREEDY_BELOW, whose logits / T overflow
        float32), or top-k 1."""
        return self.temperature < GREEDY_BELOW or self.top_k == 1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


PLACEHOLDER = -1  # an output token a step in flight is computing


class Sequence:
    """One request inside the engine: its tokens, KV blocks and sampling state."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.state_slot: int | None = None  # linear-attention state slot, while running
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.generator: torch.Generator | None = None  # set by the engine
        # a decode step launched before the last one ended (overlap schedule) leaves this many
        # placeholders (PLACEHOLDER) at the end of output_token_ids, filled in as steps end
        self.num_placeholders = 0
        self.ends_in_flight = False  # its last token is being computed: not scheduled again

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens to feed the model before the next sample (1 when decoding)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        return self.num_pending_tokens > 1

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end), without copying the whole sequence (hot path)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]


@dataclass
class RequestOutput:
    """One increment of a request's output; the last one has `finished` set."""

    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    delta_logprobs: list[float] | None
    delta_top_logprobs: list[dict[int, float]] | None
    text: str  # everything emitted so far
    token_ids: list[int]  # everything generated so far
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
