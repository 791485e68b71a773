"""AsyncEngine end to end on a tiny random checkpoint: batching, limits, stops, aborts."""
from __future__ import annotations

import asyncio

import pytest
import torch
from checkpoints import make_checkpoint
from engine_utils import read_then_close

from ktengine.config import CacheConfig, EngineConfig, SchedulerConfig
from ktengine.engine import AsyncEngine, collect
from ktengine.request import FinishReason, SamplingError, SamplingParams

PROMPTS = [[3 + i, 40, 77 + i, 120, 9, 300 - 3 * i] * (2 + i % 3) for i in range(6)]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("engine") / "ck", "Qwen3MoeForCausalLM")


def _run(ckpt, coro_fn, **config):
    async def main():
        engine = AsyncEngine(EngineConfig(model=str(ckpt), **config), progress=False)
        try:
            return await coro_fn(engine)
        finally:
            await engine.shutdown()

    return asyncio.run(main())


async def _all(engine, prompts, params):
    return await asyncio.gather(*(collect(engine.generate(p, params)) for p in prompts))


def test_preemption_under_a_small_kv_cache_keeps_outputs(ckpt):
    roomy = _run(ckpt, lambda e: _all(e, PROMPTS, GREEDY))
    tight = _run(ckpt, lambda e: _all(e, PROMPTS, GREEDY),
                 cache=CacheConfig(max_total_tokens=96, block_size=4),
                 scheduler=SchedulerConfig(chunked_prefill_size=5))
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    assert all(o.finish_reason == FinishReason.LENGTH and len(o.token_ids) == 24 for o in tight)


def test_stats_count_prompt_tokens_and_the_steps_that_carry_them(ckpt):
    async def run(engine):
        outs = await _all(engine, PROMPTS, GREEDY)
        return outs, engine.snapshot()

    outs, stats = _run(ckpt, run, scheduler=SchedulerConfig(chunked_prefill_size=5))
    prompt_tokens = sum(len(p) for p in PROMPTS)
    assert stats.prompt_tokens_total == prompt_tokens
    assert stats.generation_tokens_total == sum(len(o.token_ids) for o in outs)
    assert prompt_tokens / 5 <= stats.prefill_steps_total < stats.steps_total
    assert stats.prefill_seconds_total > 0


def test_late_joiners_get_the_same_tokens(ckpt):
    async def staggered(engine):
        tasks = []
        for p in PROMPTS:
            tasks.append(asyncio.ensure_future(collect(engine.generate(p, GREEDY))))
            await asyncio.sleep(0.01)
        return await asyncio.gather(*tasks)

    alone = [_run(ckpt, lambda e, p=p: _all(e, [p], GREEDY))[0] for p in PROMPTS[:2]]
    joined = _run(ckpt, staggered)
    assert [o.token_ids for o in joined[:2]] == [o.token_ids for o in alone]


def test_logprobs_are_the_models(ckpt):
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3)
    out = _run(ckpt, lambda e: _all(e, PROMPTS[:1], params))[0]
    full = torch.tensor([PROMPTS[0] + out.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(hf(full).logits[0].float(), -1)
    n = len(PROMPTS[0])
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.delta_logprobs)):
        assert lp == pytest.approx(ref[n - 1 + i, tok].item(), abs=1e-4)
        assert max(out.delta_top_logprobs[i], key=out.delta_top_logprobs[i].get) == tok


def test_stop_strings_stop_token_ids_and_eos(ckpt):
    free = _run(ckpt, lambda e: _all(e, PROMPTS[:1], GREEDY))[0]
    text, tokens = free.text, free.token_ids
    stop = text[len(text) // 2: len(text) // 2 + 3]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop])
    out = _run(ckpt, lambda e: _all(e, PROMPTS[:1], params))[0]
    assert out.finish_reason == FinishReason.STOP and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]

    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=[tokens[5]])
    out = _run(ckpt, lambda e: _all(e, PROMPTS[:1], params))[0]
    assert out.finish_reason == FinishReason.STOP and out.stop_reason == tokens[5]
    assert out.token_ids == tokens[: tokens.index(tokens[5]) + 1]

    async def with_eos(engine):
        engine.tokenizer.eos_token_ids = frozenset({tokens[3]})
        params = SamplingParams(max_tokens=24, temperature=0.0)
        return await _all(engine, PROMPTS[:1], params)

    out = _run(ckpt, with_eos)[0]
    assert out.finish_reason == FinishReason.STOP and out.token_ids[-1] == tokens[3]


def test_seeded_sampling_is_reproducible_in_any_batch(ckpt):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    alone = _run(ckpt, lambda e: _all(e, PROMPTS[:1], params))[0]

    async def crowded(engine):
        outs = await asyncio.gather(*(collect(engine.generate(p, other)) for p in PROMPTS[1:]),
                                    collect(engine.generate(PROMPTS[0], params)))
        return outs[-1]

    assert _run(ckpt, crowded).token_ids == alone.token_ids


async def _stream_and_leave(engine, close: bool):
    """Reads a long request's first tokens and leaves it (with aclose(), or dropping the
    stream); returns free blocks before, after the request went, and the stats."""
    free_before = engine.scheduler.allocator.num_free
    stream = engine.generate(PROMPTS[2], SamplingParams(max_tokens=400, ignore_eos=True))
    async for out in stream:
        if out.delta_token_ids:
            break
    if close:
        await stream.aclose()
    del stream, out  # without aclose(): the last references go, and the stream with them
    for _ in range(200):
        if engine.snapshot().num_running == 0:
            break
        await asyncio.sleep(0.01)
    return free_before, engine.scheduler.allocator.num_free, engine.snapshot()


@pytest.mark.parametrize("close", [True, False], ids=["aclose", "leaving_the_loop"])
def test_abort_frees_kv_memory_at_once(ckpt, close):
    """Leaving the loop early aborts the request too: the engine holds its streams weakly."""
    before, after, stats = _run(ckpt, lambda engine: _stream_and_leave(engine, close))
    assert after == before and stats.num_running == 0 and stats.requests_total.get("abort") == 1


def test_bad_requests_are_rejected_with_the_parameter_named(ckpt):
    async def check(engine):
        errors = {}
        cases = {
            "prompt": ([], SamplingParams()),
            "max_tokens": ([1, 2], SamplingParams(max_tokens=engine.max_model_len)),
            "temperature": ([1, 2], SamplingParams(temperature=3.0)),
            "top_p": ([1, 2], SamplingParams(top_p=-0.5)),
        }
        for name, (prompt, params) in cases.items():
            with pytest.raises(SamplingError) as info:
                engine.generate(prompt, params)
            errors[name] = info.value.param
        return errors

    assert _run(ckpt, check, cache=CacheConfig(max_model_len=64)) == {
        "prompt": "prompt", "max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
    }


def test_overlap_schedule_gives_the_outputs_of_one_step_at_a_time(ckpt):
    """The next step starts before the last one's outputs go out: a sequence a stop string ends
    is then in the running step already; its extra token must not show, and every KV block and
    running slot must come back."""
    free = _run(ckpt, lambda e: _all(e, PROMPTS[:3], GREEDY))
    params = [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                       stop=[free[0].text[len(free[0].text) // 3:][:2]]),
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                       stop_token_ids=[free[1].token_ids[4]]),
        SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
    ]

    async def mixed(engine):
        total = engine.scheduler.allocator.num_free
        outs = await asyncio.gather(*(collect(engine.generate(PROMPTS[i % 3], p))
                                      for i, p in enumerate(params)))
        for _ in range(100):
            if not engine.scheduler.has_work():
                break
            await asyncio.sleep(0.01)
        return outs, engine.scheduler.allocator.num_free == total, engine.scheduler.num_running

    def summary(outs):  # logprobs apart: a batch of other rows may round differently
        return [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in outs]

    serial, serial_freed, _ = _run(ckpt, mixed, disable_overlap_schedule=True)
    overlap, freed, running = _run(ckpt, mixed)
    assert summary(overlap) == summary(serial)
    assert overlap[3].delta_logprobs == pytest.approx(serial[3].delta_logprobs, abs=1e-4)
    assert serial[0].finish_reason == FinishReason.STOP and serial[0].stop_reason is not None
    assert [len(o.token_ids) for o in serial[2:]] == [5, 20, 1]
    assert freed and serial_freed and running == 0


def test_aborts_and_stops_racing_the_step_thread_leave_nothing_behind(ckpt):
    """Streams closed at random points while the step thread runs ahead, beside requests that
    end by length and stop strings: the others' outputs are unchanged, every KV block and
    running slot comes back, and the engine keeps serving."""
    free = _run(ckpt, lambda e: _all(e, PROMPTS[:1], GREEDY))[0]
    stop = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                          stop=[free.text[len(free.text) // 2:][:2]])
    short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    async def crowd(engine):
        total = engine.scheduler.allocator.num_free

        kept = [collect(engine.generate(PROMPTS[0], stop)), collect(engine.generate(PROMPTS[1], short)),
                collect(engine.generate(PROMPTS[2], GREEDY))]
        long = SamplingParams(max_tokens=200, ignore_eos=True)
        cuts = [read_then_close(engine, PROMPTS[i % len(PROMPTS)], after, long)
                for i, after in enumerate([1, 2, 3, 5, 8, 13])]
        outs = (await asyncio.gather(*kept, *cuts))[:3]
        for _ in range(200):
            if not engine.scheduler.has_work() and engine.scheduler.allocator.num_free == total:
                break
            await asyncio.sleep(0.01)
        after = await collect(engine.generate(PROMPTS[1], short))
        return outs, after, engine.scheduler.allocator.num_free == total, engine.snapshot()

    alone = [_run(ckpt, lambda e, p=p, q=q: _all(e, [p], q))[0]
             for p, q in ((PROMPTS[0], stop), (PROMPTS[1], short), (PROMPTS[2], GREEDY))]
    outs, after, freed, stats = _run(ckpt, crowd)
    assert [(o.token_ids, o.text, o.finish_reason) for o in outs] == \
        [(o.token_ids, o.text, o.finish_reason) for o in alone]
    assert after.token_ids == alone[1].token_ids
    assert freed and stats.num_running == 0 and stats.num_waiting == 0
    assert stats.requests_total.get("abort") == 6


def test_a_broken_step_thread_fails_requests_instead_of_hanging(ckpt):
    from ktengine.engine import EngineError

    async def broken(engine):
        def boom(out):
            raise RuntimeError("bug in the step thread")

        engine._advance = boom
        with pytest.raises(EngineError, match="bug in the step thread"):
            await asyncio.wait_for(collect(engine.generate(PROMPTS[0], GREEDY)), timeout=30)
        with pytest.raises(EngineError, match="the engine failed"):
            engine.generate(PROMPTS[1], GREEDY)
        return True

    assert _run(ckpt, broken)


def test_a_failing_step_still_delivers_the_last_steps_tokens(ckpt):
    """A step that raises before it launches anything: the requests it held fail, and one
    that the step before it had just finished still gets its last token and its end."""
    short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    want = _run(ckpt, lambda e: _all(e, PROMPTS[:1], short))[0]

    async def failing(engine):
        real, steps = engine.runner.step, []

        def step(batch, launched=None):
            steps.append(len(batch.items))
            if len(steps) > 1 and len(batch.items) == 1:  # the long request alone: fail
                raise RuntimeError("device lost")
            return real(batch, launched)

        engine.runner.step = step
        ended = asyncio.ensure_future(collect(engine.generate(PROMPTS[0], short)))
        long = collect(engine.generate(PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True)))
        with pytest.raises(EngineError, match="device lost"):
            await asyncio.wait_for(long, timeout=30)
        return await asyncio.wait_for(ended, timeout=30)

    from ktengine.engine import EngineError

    got = _run(ckpt, failing)
    assert got.token_ids == want.token_ids and got.finish_reason == FinishReason.LENGTH
