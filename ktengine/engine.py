"""AsyncEngine: the asyncio front of the engine.

A step thread owns the stepping: it schedules a batch, runs the model step (the CPU and GPU
work), appends the sampled tokens and schedules the next, back to back, without waiting for
the event loop. Decode steps of CUDA graphs whose tokens are drawn on the device (greedy or
sampled, without log-probs or penalties) go further: the next step is scheduled and launched
while the one before still runs, its rows' input tokens taken on the device from the step
before, so the host's share of a step hides behind the device's (a sequence's token list
holds a placeholder until its token is known; an end by EOS is seen one step late, and that
step's token for it is dropped). The event loop turns tokens into outputs (detokenizing, stop strings, the
streams) and takes requests in and out; the two share the scheduler under one lock. Every
request gets a RequestStream: an async iterator of RequestOutput that merges increments when
its reader is slow, so memory per stream stays bounded.
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field

import torch

from ktengine.config import EngineConfig
from ktengine.detokenizer import IncrementalDetokenizer
from ktengine.errors import KtengineError
from ktengine.model_runner import InFlight, StepOutput
from ktengine.request import (
    PLACEHOLDER,
    FinishReason,
    RequestOutput,
    SamplingError,
    SamplingParams,
    Sequence,
    SequenceStatus,
)
from ktengine.scheduler import Batch, ScheduledSeq, Scheduler
from ktengine.startup import LoadedModel, load
from ktengine.stream import RequestStream, collect

__all__ = ["AsyncEngine", "EngineError", "EngineStats", "RequestStream", "collect"]

log = logging.getLogger(__name__)


class EngineError(KtengineError):
    """The engine failed while running a request; the request is over."""


@dataclass
class _Live:
    seq: Sequence
    # weak: the engine must not keep a stream alive that its reader dropped, or the stream's
    # __del__ (which aborts the request) never runs and the request decodes to max_tokens
    stream_ref: weakref.ref[RequestStream]
    detok: IncrementalDetokenizer
    emitted_tokens: int = 0

    @property
    def stream(self) -> RequestStream | None:
        return self.stream_ref()


@dataclass
class _NewToken:
    """A token a step sampled for a live sequence, on its way to the stream."""

    live: _Live
    token: int
    logprob: float | None
    top: dict[int, float] | None
    reason: FinishReason | None  # the token ends the sequence: EOS or a stop token, or length
    stop_token: int | None


class _Launch:
    """Passed to the runner as its `launched` event: set() once the step's device work is
    under way hands the last step's outputs to the event loop."""

    def __init__(self, engine: AsyncEngine, tokens: list[_NewToken] | None) -> None:
        self.engine, self.tokens = engine, tokens

    def set(self) -> None:
        if self.tokens is not None:
            tokens, self.tokens = self.tokens, None
            self.engine._post(tokens)


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    requests_total: dict[str, int] = field(default_factory=dict)  # by finish reason
    steps_total: int = 0
    prefill_steps_total: int = 0  # steps that carried prompt tokens (chunks, maybe with decodes)
    prefill_seconds_total: float = 0.0  # their wall time, from launch to sampled tokens
    gpu_expert_share: float = 0.0  # share of routed (token, expert) pairs served on the GPU


class AsyncEngine:
    """Continuous-batching MoE inference engine with an asyncio interface.

    >>> engine = AsyncEngine(EngineConfig())          # the built-in demo model
    >>> async for out in engine.generate(ids, SamplingParams(max_tokens=8)): ...
    """

    def __init__(self, config: EngineConfig | None = None, *, progress: bool = True,
                 loaded: LoadedModel | None = None) -> None:
        """`loaded`: a model `startup.load` already built for this config, served instead of
        loading one (benchmarks that switch placements between engines); its owner closes it."""
        self.config = config or EngineConfig()
        self._owns_model = loaded is None
        loaded = loaded or load(self.config, progress=progress)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.model_config
        self.model_dir = loaded.model_dir
        self.model_name = self.config.served_model_name or loaded.default_name
        self.max_model_len = loaded.max_model_len
        self.device = loaded.device
        self.scheduler = Scheduler(self.config.scheduler, loaded.kv_cache.allocator,
                                   loaded.kv_cache.state_slots)
        self.recorder = loaded.recorder  # None unless a recorder mode was asked for
        self.dynamic = loaded.dynamic  # None unless dynamic expert update is on
        self.runner = loaded.runner()
        self.stats = EngineStats()
        self._live: dict[str, _Live] = {}
        self._release: list[tuple[Sequence, FinishReason]] = []  # ended during a step
        self._rng = random.Random(self.config.seed)
        # shared by the event loop and the step thread: the scheduler, _live, _release, stats
        self._lock = threading.RLock()
        self._work = threading.Event()  # set when requests arrive or the engine closes
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stepping = False
        self._closed = False
        self._failure: BaseException | None = None  # what stopped the step thread
        self.overlap_schedule = not self.config.disable_overlap_schedule  # read every step

    # -- requests ---------------------------------------------------------------------------

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises SamplingError (param named) for a request this engine cannot serve."""
        params.validate()
        if not prompt_token_ids:
            raise SamplingError("prompt", "the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not (0 <= t < vocab) for t in prompt_token_ids):
            raise SamplingError("prompt", f"prompt token ids must be in [0, {vocab})")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise SamplingError("logit_bias", f"logit_bias token ids must be in [0, {vocab})")
        if params.stop_token_ids and max(params.stop_token_ids) >= vocab:
            raise SamplingError("stop_token_ids", f"stop_token_ids must be in [0, {vocab})")
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise SamplingError(
                "messages", f"the prompt has {n} tokens; this model's context is {self.max_model_len}"
            )
        if n + params.max_tokens > self.max_model_len:
            raise SamplingError(
                "max_tokens",
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"length {self.max_model_len}",
            )

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Adds a request; iterate the returned stream for its outputs."""
        params = params or SamplingParams()
        self.check_request(prompt_token_ids, params)
        if self._failure is not None:
            raise EngineError(f"the engine failed: {self._failure}")
        if self._closed:
            raise EngineError("the engine is shut down")
        if len(self.scheduler.waiting) >= self.config.scheduler.max_waiting_requests:
            raise EngineError("too many waiting requests; try again later")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._live:  # only this thread adds requests
            raise SamplingError("request_id", f"request id {request_id!r} is already running")
        seq = Sequence(request_id, prompt_token_ids, params)
        seq.generator = torch.Generator().manual_seed(
            params.seed if params.seed is not None else self._rng.getrandbits(63)
        )
        stream = RequestStream(self, seq)
        detok = IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, stop=params.stop,
            skip_special_tokens=params.skip_special_tokens,
        )
        with self._lock:
            self._live[request_id] = _Live(seq, weakref.ref(stream), detok)
            self.scheduler.add(seq)
        self._ensure_thread()
        self._work.set()
        return stream

    add_request = generate

    def abort(self, request_id: str) -> None:
        """Cancels a request (no-op if it already ended); its KV memory is freed once no step
        that reads it is running. Call from the event loop's thread."""
        live = self._live.get(request_id)
        if live is not None:
            self._finish(live, FinishReason.ABORT, emit=True)

    def abort_soon(self, request_id: str) -> None:
        """abort() on the event loop's next turn; callable from any thread (a stream's
        __del__), a no-op once the loop is closed."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self.abort, request_id)
        except RuntimeError:  # closed meanwhile
            pass

    # -- the step thread ----------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._drive, name="ktengine-step", daemon=True)
            self._thread.start()

    def _drive(self) -> None:
        try:
            self._drive_steps()
        except BaseException as exc:  # a bug here must not leave requests waiting forever
            log.exception("the engine's step thread failed; the engine stops")
            with self._lock:
                self._closed = True
                self._failure = exc

            error = EngineError(f"the engine failed: {exc}")

            def fail_all() -> None:
                for live in list(self._live.values()):
                    self._finish(live, FinishReason.ABORT, emit=False)
                    if (stream := live.stream) is not None:
                        stream._fail(error)

            try:
                self._loop.call_soon_threadsafe(fail_all)
            except RuntimeError:
                pass

    def _drive_steps(self) -> None:
        """The step thread: schedule, step, advance, again. A step's outputs go to the event
        loop once the next step is launched (or at once when none follows), so that their
        Python work runs while the device works rather than holding the GIL this thread needs
        to launch. A batch the runner can launch ahead (can_launch) is launched while the step
        before is still in flight, which then ends (complete) behind it. With the serial
        schedule each step waits for the last one's outputs."""
        pending: list[_NewToken] | None = None  # the last ended step's tokens, not yet posted
        flight: InFlight | None = None  # a launched step that has not ended
        can_launch = getattr(self.runner, "can_launch", None)
        while True:
            self._work.clear()
            with self._lock:
                if self._closed:
                    break
                batch = self.scheduler.schedule() if self.scheduler.has_work() else None
                self._stepping = batch is not None and bool(batch.items)
            ahead = (self._stepping and self.overlap_schedule and can_launch is not None
                     and can_launch(batch))
            if flight is not None and not ahead:  # this batch needs the last step's tokens
                pending = (pending or []) + self._land(flight)
                flight = None
                if batch is not None:  # sequences that last step ended are not stepped
                    with self._lock:  # (a failed step may have cleared _stepping)
                        batch.items = [i for i in batch.items if i.seq.status is SequenceStatus.RUNNING]
                        self._stepping = bool(batch.items)
            if batch is None or not batch.items:
                with self._lock:
                    self._step_done()
                if pending:
                    self._post(pending)
                pending = None
                if batch is None:
                    self._work.wait()
                else:  # nothing fits yet; memory frees as others finish
                    self._work.wait(0.005)
                continue
            if ahead:
                try:
                    launched = self.runner.launch(batch, flight)
                except Exception as exc:  # a failed step ends its requests, not the server
                    log.exception("model step failed")
                    if flight is not None:
                        pending = (pending or []) + self._land(flight)
                        flight = None
                    if pending:
                        self._post(pending)
                    pending = None
                    self._step_failed(batch, exc)
                    continue
                with self._lock:
                    self._placeholders(launched.seqs)
                    self.stats.steps_total += 1
                if pending:
                    self._post(pending)
                    pending = None
                if flight is not None:  # the device is busy with the step just launched
                    self._post(self._land(flight))
                flight = launched
                continue
            launched = _Launch(self, pending)
            pending = None
            # read before the step, which advances the sequences
            prompt_tokens, prefill = batch.num_prompt_tokens, batch.num_prefill_tokens
            t_step = time.perf_counter()
            try:
                out = self.runner.step(batch, launched)
            except Exception as exc:  # a failed step ends its requests, not the server
                log.exception("model step failed")
                launched.set()  # the last step's outputs still go out
                self._step_failed(batch, exc)
                continue
            launched.set()  # no-op unless the runner never said when it launched
            with self._lock:
                self._step_done()
                self.stats.steps_total += 1
                self.stats.prompt_tokens_total += prompt_tokens
                if prompt_tokens or prefill:
                    self.stats.prefill_steps_total += 1
                    self.stats.prefill_seconds_total += time.perf_counter() - t_step
                pending = self._advance(out)
            if not self.overlap_schedule:
                self._post(pending, wait=True)
                pending = None
        if flight is not None:
            pending = (pending or []) + self._land(flight)
        if pending:
            self._post(pending)

    def _placeholders(self, seqs: list[Sequence]) -> None:
        """A step computing these sequences' next tokens was launched (lock held): each gets
        a placeholder token, and one whose last token that is is not scheduled again."""
        for seq in seqs:
            seq.output_token_ids.append(PLACEHOLDER)
            seq.num_placeholders += 1
            if (len(seq.output_token_ids) >= seq.params.max_tokens
                    or seq.num_tokens >= self.max_model_len):
                seq.ends_in_flight = True

    def _land(self, flight: InFlight) -> list[_NewToken]:
        """Waits for a step launched ahead and advances its sequences; returns their tokens.
        A failure ends its requests (and those of the step behind it, which read its tokens)."""
        try:
            out = self.runner.complete(flight)
        except Exception as exc:
            log.exception("model step failed")
            self._step_failed(Batch([ScheduledSeq(seq, 1) for seq in flight.seqs]), exc)
            return []
        with self._lock:
            self._release_ended()  # nothing reads them now
            return self._advance(out)

    def _post(self, tokens: list[_NewToken], wait: bool = False) -> None:
        """Hands tokens to the event loop's _postprocess; wait: until it has run."""
        done = threading.Event() if wait else None

        def run() -> None:
            try:
                self._postprocess(tokens)
            finally:
                if done is not None:
                    done.set()

        try:
            self._loop.call_soon_threadsafe(run)
        except RuntimeError:  # the event loop is closed: nobody reads the streams any more
            return
        if done is not None:
            while not done.wait(0.1):
                if self._closed or self._loop.is_closed():
                    return

    def _step_failed(self, batch: Batch, exc: Exception) -> None:
        with self._lock:
            self._step_done()
            for item in batch.items:  # not scheduled again
                if item.seq.request_id in self._live and item.seq.status is not SequenceStatus.FINISHED:
                    self.scheduler.finish(item.seq, FinishReason.ABORT)

        def fail() -> None:
            for item in batch.items:
                live = self._live.get(item.seq.request_id)
                if live is not None:
                    self._finish(live, FinishReason.ABORT, emit=False)
                    if (stream := live.stream) is not None:
                        stream._fail(EngineError(f"model step failed: {exc}"))

        try:
            self._loop.call_soon_threadsafe(fail)
        except RuntimeError:
            pass

    def _step_done(self) -> None:
        """No step runs now (lock held): the KV memory of requests that ended meanwhile goes
        back."""
        self._stepping = False
        self._release_ended()

    def _release_ended(self) -> None:
        """Requests that ended while a step read them leave the scheduler (lock held)."""
        for seq, reason in self._release:
            self.scheduler.finish(seq, reason)
        self._release.clear()

    def _advance(self, out: StepOutput) -> list[_NewToken]:
        """Appends each live sequence's sampled token and takes the sequences it ends out of
        the scheduler (lock held); returns the tokens for _postprocess."""
        now = time.monotonic()
        tokens = []
        for i, seq in enumerate(out.seqs):
            live = self._live.get(seq.request_id)
            if live is None or seq.status is SequenceStatus.FINISHED:  # ended meanwhile
                continue
            token = out.result.token_ids[i]
            outputs = seq.output_token_ids
            if seq.num_placeholders:  # launched ahead: its token fills the first placeholder
                at = len(outputs) - seq.num_placeholders
                outputs[at] = token
                seq.num_placeholders -= 1
                count = at + 1
            else:
                outputs.append(token)
                count = len(outputs)
            if seq.first_token_time is None:
                seq.first_token_time = now
            self.stats.generation_tokens_total += 1
            p = seq.params
            reason, stop_token = None, None
            if token in self.tokenizer.eos_token_ids and not p.ignore_eos:
                reason = FinishReason.STOP
            elif token in p.stop_token_ids:
                reason, stop_token = FinishReason.STOP, token
            elif count >= p.max_tokens or len(seq.prompt_token_ids) + count >= self.max_model_len:
                reason = FinishReason.LENGTH
            if reason is not None:
                # not scheduled again; a step in flight may still compute a token for it (its
                # placeholder goes), and writes to its freed KV blocks before any later step
                # (same stream) can give them to another sequence
                del outputs[count:]
                seq.num_placeholders = 0
                self.scheduler.finish(seq, reason)
            tokens.append(_NewToken(live, token, out.result.logprobs[i], out.result.top_logprobs[i],
                                    reason, stop_token))
        return tokens

    def _postprocess(self, tokens: list[_NewToken]) -> None:
        """Detokenizes the tokens _advance took, checks stop strings, and emits."""
        for t in tokens:
            live, reason, stop_reason = t.live, t.reason, t.stop_token
            if live.seq.request_id not in self._live:  # ended since
                continue
            live.emitted_tokens += 1
            delta = "" if reason is FinishReason.STOP else live.detok.add(t.token)
            if live.detok.stopped:
                reason, stop_reason = FinishReason.STOP, live.detok.stop_reason
            if reason is not None and not live.detok.stopped:
                delta += live.detok.flush()
            self._emit(live, delta, [t.token], t.logprob, t.top, reason, stop_reason)
            if reason is not None:
                self._finish(live, reason, emit=False)

    def _emit(self, live: _Live, delta: str, tokens: list[int], logprob: float | None,
              top: dict[int, float] | None, reason: FinishReason | None, stop_reason=None) -> None:
        seq = live.seq
        stream = live.stream
        if stream is None:  # its reader is gone (the request is being aborted)
            return
        want_logprobs = seq.params.logprobs is not None
        stream._put(RequestOutput(
            request_id=seq.request_id,
            delta_text=delta,
            delta_token_ids=tokens,
            delta_logprobs=[logprob] if want_logprobs and tokens else ([] if want_logprobs else None),
            delta_top_logprobs=[top or {}] if want_logprobs and tokens else ([] if want_logprobs else None),
            text=live.detok.text,
            # the step thread may have appended the next step's token already
            token_ids=seq.output_token_ids[: live.emitted_tokens],
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=len(seq.prompt_token_ids),
            stop_reason=stop_reason,
        ))

    def _finish(self, live: _Live, reason: FinishReason, emit: bool) -> None:
        with self._lock:
            if self._stepping:  # the running step may read its KV blocks and table
                self._release.append((live.seq, reason))
            else:
                self.scheduler.finish(live.seq, reason)
            self._live.pop(live.seq.request_id, None)
            self.stats.requests_total[reason.value] = self.stats.requests_total.get(reason.value, 0) + 1
        if emit:
            self._emit(live, "", [], None, None, reason)

    # -- state ------------------------------------------------------------------------------

    @property
    def failure(self) -> str | None:
        """Why the engine stopped serving after an internal error, else None."""
        return None if self._failure is None else f"{type(self._failure).__name__}: {self._failure}"

    def snapshot(self) -> EngineStats:
        self.stats.num_running = self.scheduler.num_running
        self.stats.num_waiting = self.scheduler.num_waiting
        self.stats.gpu_expert_share = self.loaded.hybrid.gpu_share
        return self.stats

    def warm_up_kernels(self) -> int:
        """Compiles, now, the GPU expert kernels that would otherwise compile (seconds each)
        inside the first requests: every MoE layer's slots at each tile size, and the slots
        that prefill moves borrow. Call before serving and after a placement change of the
        slot counts; returns the calls made."""
        hybrid = self.loaded.hybrid
        if hybrid is None:
            return 0
        t0 = time.perf_counter()
        with self._lock:
            top_k = self.model_config.top_k
            calls = sum(layer.slots.warm_up(top_k) for layer in hybrid.layers)
            mover = hybrid.layers[0].mover if hybrid.layers else None
            if mover is not None:  # one mover serves every layer
                calls += mover.warm_up(top_k)
        if calls:
            log.info("GPU expert kernels warmed up in %.1f s", time.perf_counter() - t0)
        return calls

    def capture_decode_graphs(self, max_context: int | None = None) -> int:
        """Captures the decode CUDA graphs of every batch bucket (contexts up to max_context
        tokens; None: the smallest context bucket) now rather than at their first use, which
        also runs the one-time torch.compile. Call before serving; returns the number captured
        (0 without CUDA graphs)."""
        graphs = self.runner.graphs
        from ktengine.decode_graphs import MIN_BLOCKS, GraphCaptureError

        t0 = time.perf_counter()
        with self._lock:  # no step starts meanwhile
            if graphs is None or self._stepping:
                return 0
            try:
                n = graphs.capture_all(max_context=max_context or MIN_BLOCKS * graphs.block_size)
            except GraphCaptureError as exc:  # the engine still serves, eagerly
                log.warning("CUDA graphs off: capturing the decode graphs failed (%s); decode "
                            "steps run eagerly", exc)
                self.runner.close()
                self.runner.graphs = None
                return 0
        if n:
            log.info("captured %d decode graphs in %.1f s", n, time.perf_counter() - t0)
        return n

    async def shutdown(self) -> None:
        with self._lock:
            self._closed = True
        for live in list(self._live.values()):
            self._finish(live, FinishReason.ABORT, emit=True)
        self._work.set()
        if self._thread is not None:  # ends after the step it may be running
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self.runner.close()
        if self._owns_model:
            self.loaded.close()
