"""Decode steps as CUDA graphs, the CPU experts inside them.

A decode-only batch of n sequences is padded to a batch bucket B (1, 2, 4, 8, then steps of
8) and its longest context to a bucket of blocks (powers of two); one graph per (B, blocks)
is captured the first time it is needed and replayed after. Every MoE layer's CPU experts run
inside the graph: it hands them the layer's inputs and awaits their output around the GPU
experts (HybridExperts._stream_ordered), through flags in pinned memory that a dispatcher
thread spins on (kernels or stream memory operations on the GPU's side) or through host
functions (KTENGINE_GRAPH_CPU_SYNC), so a step costs one replay, not hundreds of kernel
launches from Python.

Inputs reach the graph through fixed device buffers, which the graph itself fills from
pinned staging buffers (its first two nodes are the copies), and every row's greedy token (the
argmax of its logits) stays on the device for the next step and is copied to pinned memory
after the replay: a greedy step costs the host the launch, one copy and one wait.

Steps can be chained (launch(..., src=...)): a row whose input token is the token of a row of
the step before (its argmax, or what a sampler queued behind that step drew: launch's
`after`) takes it from the device, so the next step is launched before this one
has ended and the host's work for a step (scheduling, staging, the launch itself) overlaps the
device's. The graph echoes its step number to pinned memory once its input copies are done;
the host waits for that echo before it stages the next step, and reads each step's tokens from
its own pinned row (two, alternating). Padding rows compute garbage that nobody reads: they write their K/V to the cache's
scratch block, attend to one key, and the CPU experts skip them (live row count read at
submit). Steps the graph cannot serve (prefill, batches over the largest bucket, a recorder
that is recording) run eagerly.

Without CUDA the same fixed-shape step runs eagerly (nothing is captured): the tests use that
to check everything but the capture itself against the ordinary path.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from ktengine import env
from ktengine.kv_cache import KVCache
from ktengine.model.attention import Attention, AttentionMetadata, DecodeTables
from ktengine.model.decoder import MoEForCausalLM
from ktengine.moe.hybrid import GraphStep, HandOff, HybridSetup
from ktengine.state_cache import StateMetadata

log = logging.getLogger(__name__)

MIN_BLOCKS = 16  # smallest context bucket, in blocks
# one step's inputs, each [max_bs] in one int64 buffer (staging on the host, inputs on the
# device), then the live row count and the step's number; src: the row of the step before
# whose greedy token is this row's input token, or -1 (ids holds it)
FIELDS = ("ids", "positions", "slots", "context", "state_slots", "has_state", "src")


class GraphCaptureError(RuntimeError):
    """Capturing a decode graph failed; nothing of the step has run (the runner goes eager)."""


@dataclass
class Ticket:
    """A launched decode step, until wait() has ended it."""

    key: tuple[int, int]  # (batch bucket, context blocks)
    n: int  # live rows
    number: int  # the step's number (echoed by the graph once its inputs are copied)
    parity: int  # its row of the pinned greedy tokens and its done event
    run: int | None  # the dispatcher's run of its CPU layers
    expected: int  # CPU layers the run must complete
    logits: torch.Tensor  # [bucket, vocab], valid until the same graph replays again


def batch_buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, ... up to max_bs (which is always the last)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 8)) + [max_bs]
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model: MoEForCausalLM, kv_cache: KVCache, layer_caches: list,
                 hybrid: HybridSetup | None, device: torch.device, max_bs: int,
                 max_model_len: int, compile: bool = False) -> None:
        self.model = model
        for layer in model.model.layers:  # fewer kernels per step
            if isinstance(getattr(layer, "self_attn", None), Attention):
                layer.self_attn.fuse_qkv()
        self.layer_caches = layer_caches
        self.hybrid = hybrid
        self.device = device
        self.max_bs = max_bs
        self.buckets = batch_buckets(max_bs)
        self.block_size = kv_cache.allocator.block_size
        self.scratch_block = kv_cache.scratch_block
        self.scratch_slot = kv_cache.scratch_block * self.block_size
        self.max_blocks = -(-max_model_len // self.block_size)
        self.sliding_window = model.config.sliding_window
        self.capture = device.type == "cuda"
        self.compile = compile  # MoE layers' attention and routing through torch.compile
        b = max_bs

        def pinned(*shape, dtype):
            t = torch.zeros(*shape, dtype=dtype)
            return t.pin_memory() if self.capture else t

        self.state = kv_cache.state  # linear-attention models: per-request recurrent state
        self.scratch_state = self.state.scratch_slot if self.state is not None else 0
        self.staging = pinned(len(FIELDS) * b + 2, dtype=torch.int64)
        self.inputs = torch.zeros(len(FIELDS) * b + 2, dtype=torch.int64, device=device)
        self._live_at = len(FIELDS) * b  # then the step's number
        # block tables of graph (bucket, blocks): the first bucket*blocks entries as [bucket,
        # blocks], so that its copy is one contiguous block
        self.tables_host = pinned(b * self.max_blocks, dtype=torch.int64)
        self.tables = torch.zeros(b * self.max_blocks, dtype=torch.int64, device=device)
        # the graph copies the live row count and its step number here once its inputs are
        # in: the CPU experts read the count (the low half of the first entry) in stream
        # order, and the host knows the staging buffers are free again
        self.echo = pinned(2, dtype=torch.int64)
        self.live = self.echo.view(torch.int32)[:1]
        # each row's token: the graph writes its argmax, a draw queued behind it (launch's
        # `after`) may rewrite rows; the next step reads it here, the host from `greedy`
        self.last_tokens = torch.zeros(b, dtype=torch.int64, device=device)
        self.greedy = pinned(2, b, dtype=torch.int64)  # a step's tokens, copied after it (alternating rows)
        # numpy views: element writes cost ~0.1 us instead of a torch op each
        self._staging_np, self._tables_np = self.staging.numpy(), self.tables_host.numpy()
        self._echo_np, self._greedy_np = self.echo.numpy(), self.greedy.numpy()
        self._launched = 0  # number of the last step launched
        self._parity = 0
        self._waited = 0  # parity of the step waited for last
        self._ended = 0  # number of the step waited for last (steps end in order)
        # what the host tables hold, for the layout of graph _tables_key: per row, the block
        # table list written there and how many of its entries (entries past a row's context
        # may be stale: they are valid blocks, masked out)
        self._tables_key: tuple[int, int] | None = None
        self._table_rows: list[tuple[list[int], int] | None] = []
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        # waited on after a replay (one per row of `greedy`): a blocking event puts the waiting
        # thread to sleep instead of spinning on a core the CPU experts' threads need
        self.done = [torch.cuda.Event(blocking=True) for _ in range(2)] if self.capture else None
        self.capture_seconds = 0.0
        self.steps = 0  # decode steps run through here
        self._steps: dict[int, list[GraphStep]] = {}  # per batch bucket, per MoE layer
        self._programs: dict[int, torch.Tensor] = {}  # per bucket: the CPU layers' task addresses
        self._cpu_bufs = None
        self.dispatcher = None
        if hybrid is not None and hybrid.layers:
            cfg = model.config
            self._cpu_bufs = (pinned(b, cfg.hidden_size, dtype=cfg.dtype),
                              pinned(b, cfg.top_k, dtype=torch.int64),
                              pinned(b, cfg.top_k, dtype=torch.float32),
                              pinned(b, cfg.hidden_size, dtype=cfg.dtype))
            if self.capture and env.graph_cpu_sync() in ("flags", "kernels"):
                self._init_flags(len(hybrid.layers))
        # how graph steps hand MoE layers to the CPU experts: kernels or flags (stream memory
        # operations) on the dispatcher's flags, host (functions), or none
        self.cpu_sync = "none" if not self._cpu_bufs or not self.capture else (
            env.graph_cpu_sync() if self.dispatcher is not None else "host")
        self._handoff = None  # kernel mode: mapped buffers and flags, the programs' counters
        if self.cpu_sync == "kernels":
            from ktengine.cuda_host import mapped_tensor

            self._handoff = (tuple(mapped_tensor(t) for t in self._cpu_bufs), mapped_tensor(self.flags),
                             torch.zeros(len(hybrid.layers), dtype=torch.int32, device=device))
        log.info("decode steps in fixed shapes%s; CPU experts reached by: %s",
                 " (CUDA graphs)" if self.capture else "",
                 {"flags": "stream memory operations on flags in pinned memory",
                  "kernels": "kernels on flags in pinned memory",
                  "host": "host functions"}.get(self.cpu_sync, "-"))

    def _init_flags(self, num_layers: int) -> None:
        from ktengine.cuda_host import device_pointer
        from ktengine_ext import _moe

        # rows ready and done, each on its own 64-byte lines: the GPU's reads of done do not
        # pull the line the dispatcher polls for ready
        stride = -(-num_layers // 16) * 16
        self.flags = torch.zeros(2, stride, dtype=torch.int32).pin_memory()
        host = self.flags.data_ptr()
        assert host % 64 == 0
        self._flag_dev = device_pointer(host)
        self.dispatcher = _moe.Dispatcher(host, host + 4 * stride, num_layers, env.cpu_hold_hot())
        self._flag_stride = stride

    def _flag_addrs(self, position: int) -> tuple[int, int]:
        base = self._flag_dev
        return base + 4 * position, base + 4 * (self._flag_stride + position)

    def _start_cpu(self, bucket: int) -> tuple[int | None, int]:
        """Queues a dispatcher run of this bucket's CPU layers; returns (its id, how many)."""
        program = self._programs.get(bucket)
        if self.dispatcher is None or program is None or program.numel() == 0:
            return None, 0
        return self.dispatcher.start(program.data_ptr(), program.numel()), program.numel()

    def _finish_cpu(self, run: int | None, expected: int, failed: bool = False) -> None:
        if self.dispatcher is None or not expected:
            return
        if failed:
            self.dispatcher.abort()
            # a layer whose run the abort dropped may already be queued on the stream, waiting
            # for its done flag: answer every layer until the device is idle (the step's
            # output is dropped), or the synchronize would wait forever
            stop, done = threading.Event(), self.flags.numpy()[1]

            def answer() -> None:
                while not stop.is_set():
                    done[:] = 1
                    time.sleep(1e-4)

            helper = threading.Thread(target=answer, name="ktengine-abort", daemon=True)
            helper.start()
            try:
                torch.cuda.synchronize(self.device)
            finally:
                stop.set()
                helper.join()
            self.flags.zero_()
            return
        done = self.dispatcher.wait(run)
        if done != expected:
            raise RuntimeError(f"the CPU experts ran {done} of {expected} layers")

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.close()
            self.dispatcher = None

    @staticmethod
    def supported(model: MoEForCausalLM, kv_cache: KVCache, device: torch.device) -> str | None:
        """None if decode steps of this model can be graphs here, else why not."""
        if device.type != "cuda":
            return "not a CUDA device"
        if model.config.dtype not in (torch.bfloat16, torch.float32):
            return f"dtype {model.config.dtype} (the CPU experts take bf16 or fp32)"
        return None

    def can_run(self, batch) -> bool:
        return (0 < len(batch.items) <= self.max_bs
                and all(item.num_new_tokens == 1 and item.samples for item in batch.items))

    # -- one step ----------------------------------------------------------------------------

    def key_of(self, batch) -> tuple[int, int]:
        """The graph (batch bucket, context blocks) a decode-only batch replays."""
        n, bs = len(batch.items), self.block_size
        bucket = next(b for b in self.buckets if b >= n)
        need = max(-(-(item.seq.num_computed_tokens + 1) // bs) for item in batch.items)
        return bucket, min(self.max_blocks, max(MIN_BLOCKS, 1 << (need - 1).bit_length()))

    def ready(self, batch) -> bool:
        """True if this batch's graph is captured (a chained launch captures nothing)."""
        return not self.capture or self.key_of(batch) in self.graphs

    def run(self, batch, before=None, launched=None) -> torch.Tensor:
        """Logits [n, vocab] of a decode-only batch (num_computed_tokens not yet advanced);
        before(input_ids [n], on the host) is called just before the step runs, launched (a
        threading.Event) is set once it runs. The rows' greedy tokens are then in
        greedy_tokens(n)."""
        ticket = self.launch(batch, before=before, launched=launched)
        return self.wait(ticket)[: ticket.n]

    def launch(self, batch, src: list[int] | None = None, before=None, launched=None,
               after=None) -> Ticket:
        """Stages a decode-only batch (num_computed_tokens not yet advanced) and launches its
        step; returns at once. src[i] >= 0: row i's input token is the token of row src[i] of
        the step launched last (which may still run); its own token is not read. after(logits
        [n, vocab], tokens [n]), if given, is called once the step is launched, to queue device
        work that rewrites rows of tokens (each row's argmax until then) before they are
        copied to the host and read by the next step."""
        seqs = [item.seq for item in batch.items]
        n, bs = len(seqs), self.block_size
        key = bucket, blocks = self.key_of(batch)
        if self.capture and key not in self.graphs:
            self._add_graph(key)
        self._staging_free()
        b = self.max_bs
        st = self._staging_np
        self._pad(st)
        tables = self._tables_np[: bucket * blocks].reshape(bucket, blocks)
        if key != self._tables_key:  # another layout of the same buffer: start over
            tables.fill(self.scratch_block)
            self._tables_key, self._table_rows = key, [None] * bucket
        rows = self._table_rows
        for i, seq in enumerate(seqs):
            p = seq.num_computed_tokens
            if src is not None and src[i] >= 0:
                st[6 * b + i] = src[i]
            else:
                st[i] = seq.tokens(p, p + 1)[0]
            st[b + i] = p
            st[2 * b + i] = seq.block_table[p // bs] * bs + p % bs
            st[3 * b + i] = p + 1
            if self.state is not None:
                st[4 * b + i] = seq.state_slot
                st[5 * b + i] = p > 0  # a one-token prompt starts from zero state
            # a block table only grows (a preempted sequence gets a new list), so a row that
            # holds this list already needs only its new blocks: O(1) per step, not O(context)
            nb, row, table = -(-(p + 1) // bs), rows[i], seq.block_table
            done = min(row[1], nb) if row is not None and row[0] is table else 0
            if done < nb:
                tables[i, done:nb] = table[done:nb]
            rows[i] = (table, nb)
        for i in range(n, bucket):  # padding rows read one key: the scratch block's
            if rows[i] is not None:
                tables[i, 0] = self.scratch_block
                rows[i] = None
        st[self._live_at] = n
        ticket = self._ticket(key, n)
        if before is not None:
            before(self.staging[:n])
        if self.capture:
            self._replay(ticket, launched, after)
        else:
            if launched is not None:
                launched.set()
            ticket.logits = self._step(bucket, blocks)
            if after is not None:
                after(ticket.logits[:n], self.last_tokens[:n])
            self.greedy[ticket.parity, :bucket].copy_(self.last_tokens[:bucket])
        if self.hybrid is not None:
            pairs = n * self.model.config.top_k
            for layer in self.hybrid.layers:
                layer.num_pairs += pairs
        self.steps += 1
        return ticket

    def _staging_free(self) -> None:
        """Waits until the step launched last has copied its inputs from the staging buffers
        (at once unless it is still queued behind the one before)."""
        if not self.capture or self._echo_np[1] == self._launched:
            return
        deadline = time.perf_counter() + 0.002
        while self._echo_np[1] != self._launched:
            if time.perf_counter() > deadline:  # rare: the device is far behind
                torch.cuda.current_stream(self.device).synchronize()
                break
            time.sleep(0)

    def _replay(self, ticket: Ticket, launched=None, after=None) -> None:
        graph, ticket.logits = self.graphs[ticket.key]
        ticket.run, ticket.expected = self._start_cpu(ticket.key[0])
        try:
            graph.replay()
            if launched is not None:
                launched.set()
            if after is not None:
                after(ticket.logits[: ticket.n], self.last_tokens[: ticket.n])
            self.greedy[ticket.parity, : ticket.key[0]].copy_(self.last_tokens[: ticket.key[0]],
                                                               non_blocking=True)
            self.done[ticket.parity].record()
        except BaseException:
            self._finish_cpu(ticket.run, ticket.expected, failed=True)
            raise

    def wait(self, ticket: Ticket) -> torch.Tensor:
        """Waits for a launched step; returns its logits [bucket, vocab]. Its greedy tokens
        are then in tokens(ticket) (and greedy_tokens(n), until the next wait)."""
        if self.capture:
            try:
                self.done[ticket.parity].synchronize()
            except BaseException:
                self._finish_cpu(ticket.run, ticket.expected, failed=True)
                raise
            self._finish_cpu(ticket.run, ticket.expected)
            if any(step.call is not None and not step.call.ok
                   for step in self._steps.get(ticket.key[0], [])):
                raise MemoryError("the CPU experts could not allocate their workspace: this "
                                  "step's output is incomplete")
        self._waited = ticket.parity
        self._ended = ticket.number
        return ticket.logits

    @property
    def in_flight(self) -> int:
        """Steps launched and not yet waited for."""
        return self._launched - self._ended

    def tokens(self, ticket: Ticket) -> list[int]:
        """The token of each live row of a step wait() has ended (its argmax, or what `after`
        wrote)."""
        return self._greedy_np[ticket.parity, : ticket.n].tolist()

    def replay(self, key: tuple[int, int], launched=None) -> torch.Tensor:
        """Replays the graph of (batch bucket, context blocks) on the inputs staged last
        (benchmarks), the CPU experts' dispatcher around it; returns its logits [bucket,
        vocab] once done."""
        self._staging_free()
        ticket = self._ticket(key, int(self._staging_np[self._live_at]))
        self._replay(ticket, launched)
        return self.wait(ticket)

    def _ticket(self, key: tuple[int, int], n: int) -> Ticket:
        """The next step's number (staged, for the graph to echo) and pinned row."""
        self._launched += 1
        self._parity ^= 1
        self._staging_np[self._live_at + 1] = self._launched
        return Ticket(key, n, self._launched, self._parity, None, 0, None)

    def capture_all(self, max_batch: int | None = None, max_context: int | None = None) -> int:
        """Captures every graph decode steps up to these sizes can need (all batch buckets ×
        context buckets), so that no capture falls inside a timed run; returns how many."""
        if not self.capture:
            return 0
        max_batch = min(max_batch or self.max_bs, self.max_bs)
        max_blocks = self.max_blocks if max_context is None else min(
            self.max_blocks, -(-max_context // self.block_size))
        contexts = sorted({min(self.max_blocks, max(MIN_BLOCKS, 1 << (n - 1).bit_length()))
                           for n in range(1, max_blocks + 1)})
        buckets = [b for b in self.buckets if b < max_batch] + [next(b for b in self.buckets if b >= max_batch)]
        new = [(b, c) for b in buckets for c in contexts if (b, c) not in self.graphs]
        for key in new:
            self._add_graph(key)
        return len(new)

    def _add_graph(self, key: tuple[int, int]) -> None:
        """Captures one graph; any failure comes out as GraphCaptureError."""
        try:
            self.graphs[key] = self._capture(*key)
        except Exception as exc:  # re-raised as the one error callers handle
            raise GraphCaptureError(f"{type(exc).__name__}: {exc}") from exc

    def greedy_tokens(self, n: int) -> list[int]:
        """The argmax token of each of the first n rows of the step waited for last."""
        return self._greedy_np[self._waited, :n].tolist()

    def _pad(self, buf) -> None:
        """Every row padding: token 0 at position 0, K/V to the scratch block, one key, the
        scratch state slot from zero state; no live rows."""
        b = self.max_bs
        buf[: self._live_at + 1] = 0
        buf[2 * b: 3 * b] = self.scratch_slot
        buf[3 * b: 4 * b] = 1
        buf[4 * b: 5 * b] = self.scratch_state
        buf[6 * b: 7 * b] = -1

    # -- capture -----------------------------------------------------------------------------

    def _warm_up(self, bucket: int, blocks: int, stream: torch.cuda.Stream) -> None:
        """One uncaptured step of (bucket, blocks) on `stream`, the CPU layers run for real."""
        run, expected = self._start_cpu(bucket)  # the warm-up runs the flags for real
        try:
            with torch.cuda.stream(stream):
                self._step(bucket, blocks)
            torch.cuda.synchronize(self.device)
        except BaseException:
            self._finish_cpu(run, expected, failed=True)
            raise
        self._finish_cpu(run, expected)

    def _step(self, bucket: int, blocks: int) -> torch.Tensor:
        """What a graph holds: the inputs' copies in, their echo out, the forward pass, the
        greedy tokens kept on the device; returns the logits [bucket, vocab]."""
        area = bucket * blocks
        self.inputs.copy_(self.staging, non_blocking=True)
        self.tables[:area].copy_(self.tables_host[:area], non_blocking=True)
        self.echo.copy_(self.inputs[self._live_at:], non_blocking=True)
        logits = self._forward(bucket, blocks)
        self.last_tokens[:bucket].copy_(torch.argmax(logits, dim=-1))
        return logits

    def _forward(self, bucket: int, blocks: int) -> torch.Tensor:
        b = self.max_bs
        src = self.inputs[6 * b: 6 * b + bucket]
        ids = torch.where(src >= 0, self.last_tokens[src.clamp(min=0)], self.inputs[:bucket])
        meta = AttentionMetadata(
            positions=self.inputs[b: b + bucket],
            slot_mapping=self.inputs[2 * b: 2 * b + bucket],
            groups=[],
            decode=DecodeTables.build(self.tables[: bucket * blocks].view(bucket, blocks),
                                      self.inputs[3 * b: 3 * b + bucket],
                                      self.block_size, self.sliding_window, self.compile),
        )
        if self.state is not None:  # every row is a single-token sequence
            meta.state = StateMetadata(
                decode_rows=torch.arange(bucket, device=self.device),
                decode_slots=self.inputs[4 * b: 4 * b + bucket],
                decode_has_state=self.inputs[5 * b: 5 * b + bucket] != 0,
                prefills=[],
            )
        valid = torch.arange(bucket, device=self.device) < self.inputs[self._live_at]
        layers = self.hybrid.layers if self.hybrid is not None else []
        for layer, step in zip(layers, self._layer_steps(bucket), strict=True):
            layer.graph_step = GraphStep(step.call, step.x, step.ids, step.w, step.out, valid,
                                         step.flags, step.handoff)
        try:
            return self.model(ids, meta, self.layer_caches, None)
        finally:
            for layer in layers:
                layer.graph_step = None

    def _layer_steps(self, bucket: int) -> list[GraphStep]:
        if bucket not in self._steps and self.hybrid is not None:
            x, ids, w, out = (t[:bucket] for t in self._cpu_bufs) if self._cpu_bufs else (None,) * 4
            steps, program = [], []
            for layer in self.hybrid.layers:
                call, flags, handoff = None, None, None
                if not layer.all_on_gpu:
                    call = layer.store.bind(x, ids, w, layer.mask_row, out, self.live)
                    if self.dispatcher is not None:
                        flags = self._flag_addrs(len(program))
                        handoff = self._layer_handoff(bucket, len(program))
                        program.append(call.address)
                steps.append(GraphStep(call, x, ids, w, out, None, flags, handoff))
            self._steps[bucket] = steps
            self._programs[bucket] = torch.tensor(program, dtype=torch.int64)
        return self._steps.get(bucket, [])

    def _layer_handoff(self, bucket: int, position: int) -> HandOff | None:
        if self._handoff is None:
            return None
        bufs, flags, counters = self._handoff
        x, ids, w, out = (t[:bucket] for t in bufs)
        p = slice(position, position + 1)
        return HandOff((x, ids, w), out, flags[0, p], flags[1, p], counters[p])

    def _capture(self, bucket: int, blocks: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        t0 = time.perf_counter()
        # warm-up and capture inputs: every row padding (scratch block, no live rows)
        self._staging_free()
        self._pad(self._staging_np)
        self._staging_np[self._live_at + 1] = self._launched  # echoed as what it was
        self._tables_np.fill(self.scratch_block)
        self._tables_key = None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        self._layer_steps(bucket)
        self._warm_up(bucket, blocks, stream)  # lazy initialisation (cuBLAS workspaces, ...)
        if blocks == MIN_BLOCKS < self.max_blocks:
            # also the next context bucket, uncaptured: torch.compile specializes on context
            # sizes where a kernel changes its launches (decode attention: one split of keys,
            # or several), and this compiles that variant now, not in a user's first longer
            # request, where it would stall every running one for seconds
            self._warm_up(bucket, min(self.max_blocks, 2 * MIN_BLOCKS), stream)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(bucket, blocks)
        torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.capture_seconds += seconds
        log.info("captured the decode graph for batch %d, context up to %d tokens (%.0f ms)",
                 bucket, blocks * self.block_size, seconds * 1e3)
        return graph, logits
