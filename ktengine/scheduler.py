"""Continuous batching with chunked prefill under a per-step token budget. Plain Python.

Each step: running sequences that decode get one token each first, then unfinished
prefills continue, then waiting sequences are admitted while the token budget, the
running-request limit and free KV blocks allow. A prefill longer than the budget is
split into chunks over several steps. When KV blocks run out, the most recently admitted
sequence is preempted: its blocks are freed and it goes back to the front of the queue,
to be recomputed later (prompt and output so far).

Models with linear-attention layers also need one recurrent-state slot per running sequence:
a sequence takes a slot when admitted and gives it back when it finishes, is aborted or is
preempted (it recomputes from scratch, so its state starts over); admission stops while no
slot is free.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ktengine.config import SchedulerConfig
from ktengine.kv_cache import BlockAllocator
from ktengine.request import FinishReason, Sequence, SequenceStatus
from ktengine.state_cache import SlotAllocator


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens fed this step, from seq.num_computed_tokens on

    @property
    def samples(self) -> bool:
        """True if this step completes the sequence's pending tokens, so a token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class Batch:
    items: list[ScheduledSeq]

    @property
    def num_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.items)

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens of prefill chunks (more than one token, or no sample yet). Read it before
        the step: `samples` reads the sequences' progress."""
        return sum(i.num_new_tokens for i in self.items if i.num_new_tokens > 1 or not i.samples)

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt positions the batch feeds (before the step, as above)."""
        return sum(min(i.num_new_tokens, max(0, len(i.seq.prompt_token_ids) - i.seq.num_computed_tokens))
                   for i in self.items)


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, allocator: BlockAllocator,
        state_slots: SlotAllocator | None = None,
    ) -> None:
        self.config = config
        self.allocator = allocator
        self.state_slots = state_slots  # None: the model keeps no per-request state
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._preempted = False  # the schedule() in progress preempted a sequence

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> Batch:
        budget = self.config.chunked_prefill_size
        items: list[ScheduledSeq] = []
        # Decodes first (they are cheap and latency-bound), then continuing prefills.
        order = sorted(self.running, key=lambda s: s.is_prefill)
        self._preempted = False
        for seq in order:
            if seq.status is not SequenceStatus.RUNNING or seq.ends_in_flight:
                continue  # preempted earlier in this loop, or its last token is on its way
            n = min(seq.num_pending_tokens, budget)
            if n == 0:
                break
            if not self._reserve(seq, n, items):
                continue
            items.append(ScheduledSeq(seq, n))
            budget -= n
        # A step that had to preempt admits nobody: the sequence just preempted sits at the
        # front of the queue and would take the blocks back at once, only to be preempted again.
        while (self.waiting and budget > 0 and not self._preempted
               and len(self.running) < self.config.max_running_requests):
            if self.state_slots is not None and self.state_slots.num_free == 0:
                break
            seq = self.waiting[0]
            n = min(seq.num_pending_tokens, budget)
            need = self.allocator.blocks_needed(seq.num_computed_tokens + n, len(seq.block_table))
            if not self.allocator.can_allocate(need):
                break
            self.waiting.popleft()
            seq.block_table += self.allocator.allocate(need)
            if self.state_slots is not None:
                seq.state_slot = self.state_slots.allocate()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            items.append(ScheduledSeq(seq, n))
            budget -= n
        return Batch(items)

    def _reserve(self, seq: Sequence, n: int, scheduled: list[ScheduledSeq]) -> bool:
        """Allocates the blocks seq needs for n more tokens, preempting newer sequences."""
        need = self.allocator.blocks_needed(seq.num_computed_tokens + n, len(seq.block_table))
        while not self.allocator.can_allocate(need):
            victims = [s for s in self.running if s is not seq and all(i.seq is not s for i in scheduled)]
            victim = victims[-1] if victims else seq
            self._preempt(victim)
            if victim is seq:
                return False
        seq.block_table += self.allocator.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._preempted = True
        self.running.remove(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []
        self._release_state(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Removes a sequence (finished or aborted) and frees its KV blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []
        self._release_state(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _release_state(self, seq: Sequence) -> None:
        if seq.state_slot is not None:
            self.state_slots.free(seq.state_slot)
            seq.state_slot = None
