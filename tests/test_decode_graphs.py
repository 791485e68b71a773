"""Fixed-shape decode steps (what CUDA graphs replay), run eagerly on the CPU here: the
block-table attention, the sync-free GPU-expert paths, the padding and the CPU experts'
host-function calls must give what the ordinary path gives. tests/test_gpu.py captures them."""
from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F
from checkpoints import make_checkpoint
from engine_utils import read_then_close

from ktengine.config import CacheConfig, EngineConfig, PlacementConfig, SchedulerConfig
from ktengine.decode_graphs import DecodeGraphs, batch_buckets
from ktengine.engine import AsyncEngine, collect
from ktengine.model.attention import AttentionMetadata, DecodeTables, build_group, paged_attention
from ktengine.moe.gpu_experts import GpuExpertSlots, torch_experts_forward
from ktengine.request import SamplingParams
from ktengine.sampler import sample


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_block_table_attention_matches_the_group_path(heads, kv_heads, window):
    g = torch.Generator().manual_seed(0)
    bs, num_blocks, d = 4, 40, 16
    k_cache = torch.randn(num_blocks * bs, kv_heads, d, generator=g)
    v_cache = torch.randn(num_blocks * bs, kv_heads, d, generator=g)
    ctx = [1, 7, 13, 4]
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, keys, at = [], [], 0
    for c in ctx:
        n = -(-c // bs)
        tables.append(perm[at: at + n])
        at += n
        keys.append([tables[-1][p // bs] * bs + p % bs for p in range(c)])
    q = torch.randn(len(ctx), heads, d, generator=g)
    k_new = torch.randn(len(ctx), kv_heads, d, generator=g)
    v_new = torch.randn(len(ctx), kv_heads, d, generator=g)
    slot_mapping = torch.tensor([k[-1] for k in keys])
    group = build_group(list(range(len(ctx))), [1] * len(ctx), [c - 1 for c in ctx], keys, window,
                        torch.device("cpu"))
    want = paged_attention(q, k_new, v_new, AttentionMetadata(
        torch.tensor([c - 1 for c in ctx]), slot_mapping, [group]), (k_cache.clone(), v_cache.clone()), 0.25)
    width = 8  # padded past every table
    padded = torch.full((len(ctx), width), num_blocks - 1, dtype=torch.int64)
    for i, t in enumerate(tables):
        padded[i, : len(t)] = torch.tensor(t)
    meta = AttentionMetadata(torch.tensor([c - 1 for c in ctx]), slot_mapping, [],
                             decode=DecodeTables.build(padded, torch.tensor(ctx), bs, window))
    got = paged_attention(q, k_new, v_new, meta, (k_cache.clone(), v_cache.clone()), 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 3, 12])  # 2 pairs per token: 1 token gathers, 3+ run every slot
def test_static_gpu_expert_paths_match_the_loop(tokens):
    g = torch.Generator().manual_seed(1)
    E, H, I, k = 16, 32, 24, 2
    gate, up = torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g)
    down = torch.randn(E, H, I, generator=g)
    resident = [1, 4, 5, 9, 11, 12, 14]
    slots = GpuExpertSlots(gate, up, down, resident, E, torch.device("cpu"))
    x = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g)
    counter = torch.zeros(1, dtype=torch.int64)
    valid = torch.arange(tokens) < max(1, tokens - 1)  # the last row is padding
    got = slots.forward_static(x, ids, w, F.silu, counter, valid)
    mask = torch.zeros(E, dtype=torch.bool)
    mask[resident] = True
    ref_ids = torch.where(mask[ids], ids, torch.full_like(ids, E))  # E: skipped by the loop
    want = torch_experts_forward(x, gate, up, down, ref_ids, w, F.silu)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert int(counter) == int((mask[ids] & valid[:, None]).sum())


# five sequences (batch bucket 8: three padding rows); the last prompt is one token, so its
# first step is a fixed-shape step that starts from zero state
PROMPTS = [[3 + i, 40, 77 + i, 120, 9, 300 - 3 * i] * (2 + 3 * i) for i in range(4)] + [[17]]
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module", params=["Qwen2MoeForCausalLM", "Qwen3NextForCausalLM"])
def ckpt(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("graphs") / "ck", request.param)


def _engine(ckpt, fixed_shape: bool = True, max_bs: int = 8, **config) -> AsyncEngine:
    """An engine on ckpt; fixed_shape: decode steps through DecodeGraphs, captured on CUDA,
    or the same fixed-shape steps run eagerly on a CPU (launched ahead where they can)."""
    cuda = torch.cuda.is_available()
    engine = AsyncEngine(EngineConfig(model=str(ckpt), disable_cuda_graph=not (fixed_shape and cuda),
                                      cuda_graph_max_bs=max_bs, **config), progress=False)
    if fixed_shape and not cuda:
        loaded = engine.loaded
        engine.runner.use_graphs(DecodeGraphs(
            loaded.model, loaded.kv_cache, engine.runner.layer_caches, loaded.hybrid,
            loaded.device, max_bs, loaded.max_model_len))
    return engine


def _generate(ckpt, ratio: float, fixed_shape: bool, max_bs: int = 8, params=GREEDY,
              cache: CacheConfig | None = None, prompts=PROMPTS):
    """Greedy outputs; fixed_shape: decode steps as captured graphs on CUDA, or the same
    fixed-shape steps run eagerly on a CPU. params: one for all prompts, or one per prompt."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)

    async def main():
        engine = _engine(ckpt, fixed_shape, max_bs, placement=PlacementConfig(gpu_experts_ratio=ratio),
                         scheduler=SchedulerConfig(chunked_prefill_size=16), cache=cache or CacheConfig())
        graphs = engine.runner.graphs
        assert (graphs is not None) == fixed_shape
        try:
            outs = await asyncio.gather(*(collect(engine.generate(p, q))
                                          for p, q in zip(prompts, per_prompt, strict=True)))
            return outs, engine.snapshot().gpu_expert_share, graphs
        finally:
            await engine.shutdown()

    return asyncio.run(main())


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_fixed_shape_decode_gives_the_eager_tokens(ckpt, ratio):
    ref, share_ref, _ = _generate(ckpt, ratio, fixed_shape=False)
    outs, share, graphs = _generate(ckpt, ratio, fixed_shape=True)
    assert graphs.steps > 0  # decode steps went through the fixed-shape path
    assert bool(graphs.graphs) == graphs.capture  # and were captured on CUDA
    for a, b in zip(outs, ref, strict=True):
        assert a.token_ids == b.token_ids
        assert a.finish_reason == b.finish_reason
        assert a.delta_logprobs == pytest.approx(b.delta_logprobs, abs=1e-4)
    assert share == pytest.approx(share_ref, abs=1e-9)


def test_block_tables_staged_incrementally_survive_preemption_and_row_moves(ckpt):
    """The step keeps what its host block tables hold and writes only new blocks. Seven
    sequences that end one by one (rows move within one batch bucket), grow across blocks of
    4 tokens and are preempted (new block lists) under a small KV cache give the eager
    tokens."""
    prompts = [[5 + i, 60 + 3 * i, 9] * (1 + i % 3) for i in range(7)]
    lengths = [40, 12, 34, 18, 28, 22, 37]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in lengths]
    cache = CacheConfig(block_size=4, max_total_tokens=120)
    ref, _, _ = _generate(ckpt, 0.5, False, params=params, cache=cache, prompts=prompts)
    outs, _, graphs = _generate(ckpt, 0.5, True, params=params, cache=cache, prompts=prompts)
    assert graphs.steps > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert [len(o.token_ids) for o in outs] == lengths


def test_greedy_tokens_come_from_the_step_itself(ckpt, monkeypatch):
    """Greedy rows without log-probs take the argmax the fixed-shape step computed (no
    sampling work after it; most steps launched ahead of the one before); the tokens are
    those of the eager path."""
    import ktengine.model_runner as runner_module

    calls = []

    def counting_sample(logits, seqs, argmax=None):
        calls.append(argmax is not None)
        return sample(logits, seqs, argmax)

    completed = []
    complete = runner_module.ModelRunner.complete

    def counting_complete(self, step):
        completed.append(len(step.seqs))
        return complete(self, step)

    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ref, _, _ = _generate(ckpt, 0.5, fixed_shape=False, params=plain)
    monkeypatch.setattr(runner_module, "sample", counting_sample)
    monkeypatch.setattr(runner_module.ModelRunner, "complete", counting_complete)
    outs, _, graphs = _generate(ckpt, 0.5, fixed_shape=True, params=plain)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    # launched ahead (complete) or stepped and sampled with the step's argmax
    assert completed and len(completed) + sum(calls) == graphs.steps


def _serve(ckpt, prompts, params, fixed_shape: bool, placement=None, after=None):
    """Outputs of prompts × params on one engine (fixed_shape: decode steps through
    DecodeGraphs, launched ahead where they can), whether every KV block came back, and
    after(engine)."""

    async def main():
        engine = _engine(ckpt, fixed_shape,
                         placement=placement or PlacementConfig(gpu_experts_ratio=0.5),
                         scheduler=SchedulerConfig(chunked_prefill_size=16))
        try:
            total = engine.scheduler.allocator.num_free
            outs = await asyncio.gather(*(collect(engine.generate(p, q))
                                          for p, q in zip(prompts, params, strict=True)))
            for _ in range(200):
                if not engine.scheduler.has_work():
                    break
                await asyncio.sleep(0.01)
            freed = engine.scheduler.allocator.num_free == total and engine.scheduler.num_running == 0
            return outs, freed, after(engine) if after else None
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def test_steps_launched_ahead_end_requests_as_steps_one_at_a_time_do(ckpt, monkeypatch):
    """Greedy decode steps launched before the step in flight ends read their input tokens on
    the device; a stop token (seen one step late), a stop string, max_tokens (known at launch)
    and sampled or log-prob rows beside them (which step one at a time) give the outputs of
    the ordinary path, with no placeholder left in any output and every KV block back."""
    import ktengine.model_runner as runner_module

    free, _, _ = _serve(ckpt, PROMPTS, [SamplingParams(max_tokens=24, temperature=0.0,
                                                       ignore_eos=True)] * len(PROMPTS), False)
    params = [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                       stop_token_ids=[free[0].token_ids[6]]),
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                       stop=[free[1].text[len(free[1].text) // 2:][:2]]),
        SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
    ]
    prompts = PROMPTS[:5]
    plain, plain_freed, _ = _serve(ckpt, prompts, params, False)
    launched = []
    launch = runner_module.ModelRunner.launch

    def counting_launch(self, batch, prev=None):
        launched.append(prev is not None)
        return launch(self, batch, prev)

    monkeypatch.setattr(runner_module.ModelRunner, "launch", counting_launch)
    ahead, freed, _ = _serve(ckpt, prompts, params, True)

    def summary(outs):
        return [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in outs]

    assert summary(ahead) == summary(plain)
    assert plain[0].finish_reason.value == "stop" and plain[0].token_ids[-1] == free[0].token_ids[6]
    assert [len(o.token_ids) for o in plain[2:4]] == [3, 1]
    assert sum(launched) > 5  # steps were launched while another was in flight
    assert freed and plain_freed
    # sampled and log-prob rows step one at a time, in the same batches
    mixed = params[:3] + [SamplingParams(max_tokens=12, temperature=0.9, seed=3, ignore_eos=True),
                          SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)]
    launched.clear()
    want, _, _ = _serve(ckpt, prompts, mixed, False)
    got, freed, _ = _serve(ckpt, prompts, mixed, True)
    assert summary(got) == summary(want) and freed
    assert got[4].delta_logprobs == pytest.approx(want[4].delta_logprobs, abs=1e-4)


def test_sampled_rows_launched_ahead_draw_the_tokens_of_steps_one_at_a_time(ckpt, monkeypatch):
    """Seeded sampled rows (temperature, top-k, top-p, min-p) are drawn on the device behind
    each launched step, and the next step reads them there: the same tokens as the ordinary
    path, where each step's logits are sampled on the host's watch."""
    import ktengine.model_runner as runner_module
    import ktengine.sampler as sampler_module

    monkeypatch.setattr(sampler_module, "NUCLEUS_CANDIDATES", 8)  # wide nuclei: the full sort
    monkeypatch.setattr(sampler_module.DeviceSampler, "CAPTURE_AFTER", 2)  # CUDA: replays too
    params = [SamplingParams(max_tokens=16, temperature=0.8, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=16, temperature=1.2, top_p=0.9, seed=2, ignore_eos=True),
              SamplingParams(max_tokens=16, temperature=1.0, top_k=5, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=16, temperature=1.0, min_p=0.1, seed=4, ignore_eos=True),
              SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)]
    want, _, _ = _serve(ckpt, PROMPTS[:5], params, False)
    ahead = []
    launch = runner_module.ModelRunner.launch

    def counting_launch(self, batch, prev=None):
        ahead.append(prev is not None and not all(i.seq.params.greedy for i in batch.items))
        return launch(self, batch, prev)

    monkeypatch.setattr(runner_module.ModelRunner, "launch", counting_launch)
    got, freed, _ = _serve(ckpt, PROMPTS[:5], params, True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want] and freed
    assert sum(ahead) > 5


def test_aborts_racing_steps_launched_ahead_leave_nothing_behind(ckpt):
    """Streams closed at random points while decode steps are launched ahead of each other,
    beside greedy requests that run to their end: those keep their tokens, every KV block and
    running slot comes back, and the engine serves again after."""
    keep = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    alone = [_serve(ckpt, [p], [keep], False)[0][0] for p in PROMPTS[:2]]

    async def main():
        engine = _engine(ckpt, placement=PlacementConfig(gpu_experts_ratio=0.5),
                         scheduler=SchedulerConfig(chunked_prefill_size=16))
        try:
            total = engine.scheduler.allocator.num_free

            kept = [collect(engine.generate(p, keep)) for p in PROMPTS[:2]]
            long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            cuts = [read_then_close(engine, PROMPTS[i % len(PROMPTS)], n, long)
                    for i, n in enumerate([1, 2, 3, 5, 8])]
            outs = (await asyncio.gather(*kept, *cuts))[:2]
            for _ in range(200):
                if not engine.scheduler.has_work() and engine.scheduler.allocator.num_free == total:
                    break
                await asyncio.sleep(0.01)
            freed = engine.scheduler.allocator.num_free == total
            again = await collect(engine.generate(PROMPTS[0], keep))
            stats = engine.snapshot()
            return outs, again, freed, stats, engine.runner.graphs.steps
        finally:
            await engine.shutdown()

    outs, again, freed, stats, steps = asyncio.run(main())
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert again.token_ids == alone[0].token_ids
    assert freed and stats.num_running == 0 and stats.num_waiting == 0
    assert stats.requests_total.get("abort") == 5 and steps > 0


def test_a_step_launched_ahead_that_fails_ends_its_requests_not_the_engine(ckpt, monkeypatch):
    """A step that fails when it is waited for (the step behind it already launched, reading
    its tokens): its requests fail with an error instead of hanging, their KV blocks come
    back, and the engine serves the next request."""
    import ktengine.model_runner as runner_module
    from ktengine.engine import EngineError

    keep = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = _serve(ckpt, [PROMPTS[0]], [keep], False)[0][0]
    complete = runner_module.ModelRunner.complete
    calls = []

    def failing_complete(self, step):
        calls.append(len(step.seqs))
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return complete(self, step)

    monkeypatch.setattr(runner_module.ModelRunner, "complete", failing_complete)

    async def main():
        engine = _engine(ckpt, placement=PlacementConfig(gpu_experts_ratio=0.5))
        try:
            total = engine.scheduler.allocator.num_free
            results = await asyncio.wait_for(asyncio.gather(
                *(collect(engine.generate(p, keep)) for p in PROMPTS[:3]), return_exceptions=True), 60)
            for _ in range(200):
                if not engine.scheduler.has_work():
                    break
                await asyncio.sleep(0.01)
            freed = engine.scheduler.allocator.num_free == total
            after = await asyncio.wait_for(collect(engine.generate(PROMPTS[0], keep)), 60)
            return results, freed, after, engine.snapshot()
        finally:
            await engine.shutdown()

    results, freed, after, stats = asyncio.run(main())
    assert all(isinstance(r, EngineError) and "device lost" in str(r) for r in results)
    assert freed and stats.num_running == 0
    assert after.token_ids == want.token_ids


def test_dynamic_updates_wait_for_the_step_in_flight(ckpt, monkeypatch):
    """Dynamic placement changes the mask and slots both kinds of step read: it may only run
    when no step is in flight, so steps are not launched ahead while an update is due."""
    from ktengine.moe import hybrid
    from ktengine.moe.dynamic import DynamicPlacer

    monkeypatch.setattr(hybrid, "measure_costs", lambda *a: hybrid.TransferCosts(1e-5, 1e-4))
    monkeypatch.setattr(DynamicPlacer.__init__, "__defaults__",
                        DynamicPlacer.__init__.__defaults__[:-1] + (3,))  # an update every 3 passes
    seen = []
    update = DynamicPlacer.update

    def checked_update(self):
        graphs = self._test_graphs
        seen.append(graphs is None or graphs.in_flight == 0)
        return update(self)

    monkeypatch.setattr(DynamicPlacer, "update", checked_update)
    monkeypatch.setattr(DynamicPlacer, "_test_graphs", None, raising=False)
    placement = PlacementConfig(gpu_experts_ratio=0.25, dynamic_update=True,
                                gpu_prefill_token_threshold=8)
    params = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)] * 4
    want, _, _ = _serve(ckpt, PROMPTS[:4], params, False, placement)

    real_serve_graphs = DecodeGraphs.__init__

    def track(self, *a, **k):
        real_serve_graphs(self, *a, **k)
        if self.hybrid is not None:
            DynamicPlacer._test_graphs = self

    monkeypatch.setattr(DecodeGraphs, "__init__", track)
    got, freed, updates = _serve(ckpt, PROMPTS[:4], params, True, placement,
                                 after=lambda e: e.dynamic.num_updates)
    assert updates >= 1 and seen and all(seen)
    assert [o.token_ids for o in got] == [o.token_ids for o in want] and freed


def test_capture_all_covers_every_bucket_up_to_the_sizes(ckpt, monkeypatch):
    async def main():
        engine = AsyncEngine(EngineConfig(model=str(ckpt), device="cpu"), progress=False)
        try:
            assert engine.capture_decode_graphs() == 0  # no CUDA graphs on a CPU: nothing to do
            loaded = engine.loaded
            graphs = DecodeGraphs(loaded.model, loaded.kv_cache, engine.runner.layer_caches,
                                  loaded.hybrid, loaded.device, 8, 4096)
            captured = []
            graphs.capture = True  # record what would be captured
            monkeypatch.setattr(graphs, "_capture", lambda b, c: captured.append((b, c)) or (None, None))
            n = graphs.capture_all(max_batch=5, max_context=600)
            bs = graphs.block_size
            contexts = sorted({max(16, 1 << (k - 1).bit_length()) for k in range(1, -(-600 // bs) + 1)})
            assert n == len(captured) == len(set(captured))
            assert sorted(captured) == sorted((b, c) for b in (1, 2, 4, 8) for c in contexts)
            assert graphs.capture_all(max_batch=5, max_context=600) == 0  # nothing new
            engine.runner.use_graphs(graphs)  # a capture that fails at start-up: eager serving

            def broken(bucket, blocks):
                raise RuntimeError("capture failed")

            graphs.graphs.clear()
            monkeypatch.setattr(graphs, "_capture", broken)
            assert engine.capture_decode_graphs() == 0 and engine.runner.graphs is None
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_a_failed_capture_falls_back_to_eager_steps(ckpt, caplog):
    ref, _, _ = _generate(ckpt, 0.5, fixed_shape=False)

    async def main():
        engine = AsyncEngine(EngineConfig(model=str(ckpt), placement=PlacementConfig(gpu_experts_ratio=0.5),
                                          scheduler=SchedulerConfig(chunked_prefill_size=16)),
                             progress=False)
        loaded = engine.loaded
        graphs = DecodeGraphs(loaded.model, loaded.kv_cache, engine.runner.layer_caches,
                              loaded.hybrid, loaded.device, 8, loaded.max_model_len)
        graphs.capture = True

        def broken(bucket, blocks):
            raise RuntimeError("operation not permitted when stream is capturing")

        graphs._capture = broken
        engine.runner.use_graphs(graphs)
        try:
            outs = await asyncio.gather(*(collect(engine.generate(p, GREEDY)) for p in PROMPTS))
            return outs, engine.runner.graphs
        finally:
            await engine.shutdown()

    outs, graphs_after = asyncio.run(main())
    assert graphs_after is None
    assert "CUDA graphs off" in caplog.text
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
