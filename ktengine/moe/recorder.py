"""Expert distribution recorder: which experts the router picks, per layer.

Modes (the reference system's names and file format):
  stat         counts per (hidden layer, expert), summed while recording
  stat_approx  the same, from a deterministic sample of tokens: of each forward pass's whole
               groups of `stride` tokens, the first of each group, scaled by the stride;
               the pass's last T mod stride tokens counted one by one (so every pass's
               total is exact, and a decode pass is counted exactly)
  per_pass     one count matrix per forward pass
  per_token    per_pass plus each pass's token ids and top-k ids per MoE layer
Dumps are torch files holding `logical_count: int32[buffer, num_hidden_layers, num_experts]`
(dense layers' rows are zero), so `--init-expert-location` reads any of them back. With
`record_gpu_masks`, each forward pass also records the GPU expert mask
(`gpu_expert_masks: bool[buffer, num_moe_layers, num_experts]`).

The model's worker thread feeds it (begin_pass / observe / end_pass) and alone owns the
pass in progress; start, stop and dump come from the event loop, so a lock guards the
accumulated state. A pass that began before the latest start is not counted.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from ktengine import env
from ktengine.config import ModelConfig
from ktengine.errors import ConfigError, KtengineError
from ktengine.options import RECORDER_MODES as MODES

APPROX_STRIDE = 4


class ExpertDistributionRecorder:
    def __init__(self, model: ModelConfig, mode: str | None, record_gpu_masks: bool = False,
                 gpu_mask: torch.Tensor | None = None) -> None:
        if mode is not None and mode not in MODES:
            raise ConfigError(f"unknown recorder mode {mode!r} (expected one of {', '.join(MODES)})")
        self.mode = mode
        self.record_gpu_masks = record_gpu_masks
        self.gpu_mask = gpu_mask  # the live mask, read at each pass when recording masks
        self.num_layers, self.num_experts = model.num_layers, model.num_experts
        self.layer_ids = model.moe_layer_ids
        self.recording = False
        self._lock = threading.Lock()
        self._epoch = 0  # starts so far; a pass counts only within the epoch it began in
        # the pass in progress: the model thread's alone
        self._current: torch.Tensor | None = None
        self._current_topk: list[torch.Tensor] = []
        self._input_ids: torch.Tensor | None = None
        self._pass_epoch = 0
        self._reset()

    def _reset(self) -> None:
        """Forgets what was accumulated (under the lock; the pass in progress is not touched)."""
        self._total = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64)
        self._passes: list[torch.Tensor] = []
        self._tokens: list[torch.Tensor] = []
        self._topk: list[list[torch.Tensor]] = []
        self._masks: list[torch.Tensor] = []

    # -- controls (event loop) ------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            self._reset()
            self._epoch += 1
            self.recording = True

    def stop(self) -> None:
        with self._lock:
            self.recording = False

    def dump(self, directory: str | Path | None = None) -> Path:
        """Writes what was recorded so far to a .pt file; returns its path."""
        with self._lock:
            data = self._snapshot()
        directory = Path(directory) if directory else env.expert_distribution_dir()
        path = directory / f"expert_distribution_{self.mode or 'gpu_masks'}_{time.time_ns()}.pt"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(data, path)
        except OSError as exc:
            raise KtengineError(f"cannot write {path}: {exc.strerror or exc}") from None
        return path

    def _snapshot(self) -> dict:
        if self.mode in ("per_pass", "per_token"):
            counts = torch.stack(self._passes) if self._passes else torch.zeros(0, self.num_layers, self.num_experts)
        else:
            counts = self._total[None]
        data = {"logical_count": counts.to(torch.int32), "mode": self.mode,
                "moe_layer_ids": list(self.layer_ids)}
        if self.mode == "per_token":
            data["input_ids"] = list(self._tokens)
            data["topk_ids"] = [torch.stack(t) if t else torch.zeros(0) for t in self._topk]
        if self.record_gpu_masks:
            data["gpu_expert_masks"] = (torch.stack(self._masks) if self._masks
                                        else torch.zeros(0, len(self.layer_ids), self.num_experts, dtype=torch.bool))
        return data

    # -- feed (model thread) --------------------------------------------------------------

    def begin_pass(self, input_ids: torch.Tensor, num_prefill_tokens: int = 0) -> None:
        if not self.recording:
            self._current = None
            return
        self._pass_epoch = self._epoch
        self._current = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64)
        self._current_topk = []
        self._input_ids = input_ids.detach().cpu() if self.mode == "per_token" else None

    def observe(self, moe_index: int, topk_ids: torch.Tensor) -> None:
        """Called by every MoE layer with its routing decision topk_ids [T, k]."""
        current = self._current
        if current is None or self.mode is None:
            return
        if self.mode == "stat_approx":
            whole = topk_ids.shape[0] - topk_ids.shape[0] % APPROX_STRIDE
            counts = (_bincount(topk_ids[:whole:APPROX_STRIDE], self.num_experts) * APPROX_STRIDE
                      + _bincount(topk_ids[whole:], self.num_experts))
        else:
            counts = _bincount(topk_ids, self.num_experts)
        current[self.layer_ids[moe_index]] += counts
        if self.mode == "per_token":
            self._current_topk.append(topk_ids.detach().cpu().to(torch.int32))

    def quiet(self) -> bool:
        """True if the next passes need nothing of this hook: a decode step may then be
        launched before the one in flight has ended (ModelRunner.can_launch)."""
        return not self.recording

    def end_pass(self) -> None:
        if self._current is None:
            return
        with self._lock:
            if not self.recording or self._pass_epoch != self._epoch:
                self._current = None
                return
            self._total += self._current
            if self.mode in ("per_pass", "per_token"):
                self._passes.append(self._current)
            if self.mode == "per_token":
                self._tokens.append(self._input_ids)
                self._topk.append(self._current_topk)
            if self.record_gpu_masks and self.gpu_mask is not None:
                self._masks.append(self.gpu_mask.detach().cpu().clone())
        self._current = None


def _bincount(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.bincount(ids.reshape(-1), minlength=num_experts).cpu()
