"""Turns a scheduled batch into tensors, runs the model, and samples.

Runs on the engine's step thread; owns the model, the KV cache and the device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from ktengine.kv_cache import KVCache, slots_of
from ktengine.model.attention import AttentionMetadata, build_group
from ktengine.model.decoder import MoEForCausalLM
from ktengine.request import Sequence
from ktengine.sampler import DeviceSampler, SampleResult, drawn_on_device, sample, sample_on_device
from ktengine.scheduler import Batch
from ktengine.state_cache import build_state_metadata, layer_caches

log = logging.getLogger(__name__)


class Launched(Protocol):
    """Told once a step's device work is under way (the engine then sends out the last step's
    outputs); a threading.Event will do."""

    def set(self) -> None: ...


@dataclass
class StepOutput:
    seqs: list[Sequence]  # the sequences that sampled a token this step, in order
    result: SampleResult


@dataclass
class InFlight:
    """A decode step launched through its CUDA graph, not yet ended (ModelRunner.launch)."""

    seqs: list[Sequence]  # its rows, in order
    ticket: object  # decode_graphs.Ticket


@dataclass
class StepInputs:
    """One step's inputs as plain lists; tensor-parallel rank 0 sends these to the other ranks."""

    input_ids: list[int]  # [N]
    positions: list[int]  # [N]
    slot_mapping: list[int]  # [N]
    groups: list[list[tuple[int, int, int, list[int]]]]  # per attention group, per sequence:
    #   (first row, q_len, start position, block table covering its keys); decodes share one
    #   group, prefills alone
    states: list[tuple[int, int, int, bool]] | None  # linear attention: row, n, slot, has state
    logits_rows: list[int]  # [M]
    block_size: int = 16  # of the KV cache the block tables index


def step_tensors(plan: StepInputs, sliding_window: int | None, device: torch.device,
                 ) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
    """Input ids [N], attention metadata and logits rows [M] on `device`."""
    groups = []
    for members in plan.groups:
        rows, q_lens, starts, keys = (list(col) for col in zip(*members))
        groups.append(build_group(rows, q_lens, starts, keys, sliding_window, device,
                                  block_size=plan.block_size))
    meta = AttentionMetadata(
        positions=torch.tensor(plan.positions, dtype=torch.int64, device=device),
        slot_mapping=torch.tensor(plan.slot_mapping, dtype=torch.int64, device=device),
        groups=groups,
        state=None if plan.states is None else build_state_metadata(plan.states, device),
    )
    ids = torch.tensor(plan.input_ids, dtype=torch.int64, device=device)
    return ids, meta, torch.tensor(plan.logits_rows, dtype=torch.int64, device=device)


class ModelRunner:
    def __init__(self, model: MoEForCausalLM, kv_cache: KVCache, device: torch.device,
                 pass_hooks: list | None = None) -> None:
        self.model = model
        # objects with begin_pass(input_ids, num_prefill_tokens) and end_pass(): the
        # distribution recorder and the dynamic placer
        self.pass_hooks = pass_hooks or []
        self.kv_cache = kv_cache
        self.layer_caches = layer_caches(model.config, kv_cache.layers, kv_cache.state)  # per layer
        self.device = device
        self.block_size = kv_cache.allocator.block_size
        self.sliding_window = model.config.sliding_window
        self.graphs = None  # DecodeGraphs, when decode steps replay CUDA graphs
        # sampled rows of launched steps: their draw replayed as a CUDA graph of its own
        self.device_sampler = DeviceSampler(device) if device.type == "cuda" else None

    def plan(self, batch: Batch) -> StepInputs:
        """The step's inputs as plain lists (rows, positions, cache slots, groups)."""
        plan = StepInputs([], [], [], [], None if self.kv_cache.state is None else [], [],
                          self.block_size)
        decode: list[tuple[int, int, int, list[int]]] = []  # row, q_len, start, key slots
        prefill: list[tuple[int, int, int, list[int]]] = []
        for item in batch.items:
            seq, n = item.seq, item.num_new_tokens
            start, row = seq.num_computed_tokens, len(plan.input_ids)
            plan.input_ids += seq.tokens(start, start + n)
            plan.positions += range(start, start + n)
            plan.slot_mapping += slots_of(seq.block_table, self.block_size, start, start + n)
            keys = seq.block_table[: -(-(start + n) // self.block_size)]  # O(blocks), not O(keys)
            (decode if n == 1 else prefill).append((row, n, start, keys))
            if plan.states is not None:
                plan.states.append((row, n, seq.state_slot, start > 0))
            if item.samples:
                plan.logits_rows.append(row + n - 1)
        plan.groups = ([decode] if decode else []) + [[p] for p in prefill]
        return plan

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Flat input ids [N], attention metadata, and the rows [M] whose logits are sampled."""
        return step_tensors(self.plan(batch), self.sliding_window, self.device)

    def use_graphs(self, graphs) -> None:
        """Decode steps replay CUDA graphs (DecodeGraphs) from now on, where they can."""
        self.graphs = graphs

    def close(self) -> None:
        """Stops what the runner started (the CUDA graph steps' dispatcher thread)."""
        if self.graphs is not None:
            self.graphs.close()

    def _graph_step(self, batch: Batch) -> bool:
        return (self.graphs is not None and self.graphs.can_run(batch)
                and not any(getattr(hook, "recording", False) for hook in self.pass_hooks))

    def can_launch(self, batch: Batch) -> bool:
        """True if this batch can be launched without waiting for the step in flight to end
        (launch/complete): a decode-only batch of a captured graph whose every row's token is
        drawn on the device (greedy or sampled; no log-probs, no penalties), with pass hooks
        that change nothing the device reads meanwhile."""
        return (self._graph_step(batch) and self.graphs.ready(batch)
                and all(drawn_on_device(item.seq.params) for item in batch.items)
                and all(getattr(hook, "quiet", lambda: False)() for hook in self.pass_hooks))

    def launch(self, batch: Batch, prev: InFlight | None = None) -> InFlight:
        """Launches a batch can_launch accepted and returns at once; sampled rows draw their
        tokens on the device behind it. A sequence that was a row of prev (still in flight)
        takes prev's token for it on the device: its token list holds a placeholder for it
        until complete(prev)."""
        rows = {id(seq): i for i, seq in enumerate(prev.seqs)} if prev is not None else {}
        seqs = [item.seq for item in batch.items]
        src = [rows.get(id(seq), -1) for seq in seqs]
        sampled = not all(seq.params.greedy for seq in seqs)
        ticket = self.graphs.launch(
            batch, src=src, before=self._begin_graph_pass,
            after=(lambda logits, tokens: sample_on_device(logits, seqs, tokens, self.device_sampler))
            if sampled else None)
        for seq in seqs:
            seq.num_computed_tokens += 1
        return InFlight(seqs, ticket)

    def complete(self, step: InFlight) -> StepOutput:
        """Waits for a launched step; returns each row's token."""
        self.graphs.wait(step.ticket)
        tokens = self.graphs.tokens(step.ticket)
        for hook in self.pass_hooks:
            hook.end_pass()
        n = len(step.seqs)
        return StepOutput(step.seqs, SampleResult(tokens, [None] * n, [None] * n))

    def _begin_graph_pass(self, input_ids: torch.Tensor) -> None:
        for hook in self.pass_hooks:
            hook.begin_pass(input_ids, 0)

    def step(self, batch: Batch, launched: Launched | None = None) -> StepOutput:
        """Runs one step and samples. launched, if given, is set once the step's device work is
        under way (a graph replay launched; an eager step at once): the engine produces the
        last step's outputs only then, so that their Python work does not hold the GIL while
        this thread prepares the step. (The engine also sets it after a step that failed.)"""
        logits, argmax = None, None
        if self._graph_step(batch):
            from ktengine.decode_graphs import GraphCaptureError

            try:
                logits = self.graphs.run(batch, before=self._begin_graph_pass, launched=launched)
                argmax = self.graphs.greedy_tokens(len(batch.items))
            except GraphCaptureError as exc:
                log.warning("CUDA graphs off: capturing a decode step failed (%s); decode steps "
                            "run eagerly from now on", exc)
                self.graphs.close()
                self.graphs = None
        if logits is None:
            if launched is not None:
                launched.set()
            ids, meta, rows = self.prepare(batch)
            for hook in self.pass_hooks:
                hook.begin_pass(ids, batch.num_prefill_tokens)
            logits = self.model(ids, meta, self.layer_caches, rows)
        for hook in self.pass_hooks:
            hook.end_pass()
        seqs = [item.seq for item in batch.items if item.samples]
        for item in batch.items:
            item.seq.num_computed_tokens += item.num_new_tokens
        result = sample(logits, seqs, argmax) if seqs else SampleResult([], [], [])
        return StepOutput(seqs, result)
