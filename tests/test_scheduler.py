"""The scheduler and block allocator alone: plain Python, no model."""
from ktengine.config import SchedulerConfig
from ktengine.kv_cache import BlockAllocator, slots_of
from ktengine.request import FinishReason, SamplingParams, Sequence


def _seq(name, n):
    return Sequence(name, list(range(1, n + 1)), SamplingParams(max_tokens=4))


def _run(batch):
    """Pretend the model ran: advance computed tokens, sample one token where due."""
    for item in batch.items:
        sampled = item.samples
        item.seq.num_computed_tokens += item.num_new_tokens
        if sampled:
            item.seq.output_token_ids.append(7)


def test_chunked_prefill_respects_budget_and_decodes_first():
    from ktengine.scheduler import Scheduler

    s = Scheduler(SchedulerConfig(chunked_prefill_size=8, max_running_requests=4), BlockAllocator(64, 4))
    a, b = _seq("a", 3), _seq("b", 20)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    assert [(i.seq.request_id, i.num_new_tokens) for i in batch.items] == [("a", 3), ("b", 5)]
    assert batch.items[0].samples and not batch.items[1].samples
    _run(batch)
    batch = s.schedule()  # a decodes (1 token) before b's prefill continues (7 more)
    assert [(i.seq.request_id, i.num_new_tokens) for i in batch.items] == [("a", 1), ("b", 7)]
    assert batch.num_tokens == 8


def test_preemption_frees_blocks_and_requeues_first():
    from ktengine.scheduler import Scheduler

    alloc = BlockAllocator(4, 4)  # 16 token slots in all
    s = Scheduler(SchedulerConfig(chunked_prefill_size=64), alloc)
    a, b = _seq("a", 8), _seq("b", 8)
    s.add(a)
    s.add(b)
    _run(s.schedule())
    assert alloc.num_free == 0
    batch = s.schedule()  # a needs a 3rd block: b (newest) is preempted
    assert [i.seq.request_id for i in batch.items] == ["a"]
    assert s.waiting[0] is b and b.num_computed_tokens == 0 and b.block_table == []
    s.finish(a, FinishReason.STOP)
    assert alloc.num_free == 4 - len(b.block_table)


def test_a_step_that_preempts_admits_nobody():
    """The sequence just preempted sits at the front of the queue: taking it back in the same
    step gives it blocks that the running ones need again at once (preemption thrash)."""
    from ktengine.scheduler import Scheduler

    alloc = BlockAllocator(3, 4)
    s = Scheduler(SchedulerConfig(chunked_prefill_size=5), alloc)
    a, b = _seq("a", 4), _seq("b", 12)
    s.add(a)
    s.add(b)
    batch = s.schedule()  # a's prompt, b's first token: a block each
    assert [(i.seq.request_id, i.num_new_tokens) for i in batch.items] == [("a", 4), ("b", 1)]
    _run(batch)
    batch = s.schedule()  # a's decode takes the last block; b's next chunk preempts b itself
    assert [i.seq.request_id for i in batch.items] == ["a"]
    assert list(s.waiting) == [b] and b.block_table == [] and alloc.num_free == 1
    _run(batch)
    batch = s.schedule()  # the next step takes it back
    assert [(i.seq.request_id, i.num_new_tokens) for i in batch.items] == [("a", 1), ("b", 4)]


def test_finish_of_waiting_sequence_and_slots():
    from ktengine.scheduler import Scheduler

    alloc = BlockAllocator(8, 4)
    s = Scheduler(SchedulerConfig(), alloc)
    a = _seq("a", 3)
    s.add(a)
    s.finish(a, FinishReason.ABORT)
    assert not s.has_work() and alloc.num_free == 8
    assert slots_of([5, 2], 4, 2, 6) == [22, 23, 8, 9]
