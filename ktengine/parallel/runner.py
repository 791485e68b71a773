"""Rank 0's model runner under tensor parallelism: the step's inputs go to the other ranks
first, then rank 0 runs its share; a failed step fails the whole group (workers.py)."""
from __future__ import annotations

import torch

from ktengine.kv_cache import KVCache
from ktengine.model.decoder import MoEForCausalLM
from ktengine.model_runner import ModelRunner, StepInputs, StepOutput
from ktengine.parallel.workers import WorkerPool
from ktengine.scheduler import Batch


class TensorParallelRunner(ModelRunner):
    def __init__(self, model: MoEForCausalLM, kv_cache: KVCache, device: torch.device,
                 pass_hooks: list | None, workers: WorkerPool) -> None:
        super().__init__(model, kv_cache, device, pass_hooks)
        self.workers = workers

    def plan(self, batch: Batch) -> StepInputs:
        plan = super().plan(batch)
        self.workers.send(plan)
        return plan

    def step(self, batch: Batch, launched=None) -> StepOutput:
        self.workers.check()
        try:
            return super().step(batch, launched)
        except Exception as exc:
            raise self.workers.failure(exc) from exc
