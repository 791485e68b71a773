"""One rank's side of the tensor-parallel group: its device, the rendezvous, the all-reduce.

Rank 0 hosts the TCP store on an ephemeral port (no race for a free port) and hands the port
to the other ranks. The group is torch.distributed's default process group, so a process
holds at most one tensor-parallel engine at a time.
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ktengine.config import CommBackend, ParallelConfig
from ktengine.errors import ConfigError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # every rank runs on this machine


def resolve_backend(parallel: ParallelConfig, device: torch.device) -> CommBackend:
    backend = parallel.backend or (CommBackend.NCCL if device.type == "cuda" else CommBackend.GLOO)
    if backend == CommBackend.NCCL and device.type != "cuda":
        raise ConfigError("the nccl backend needs CUDA devices; use gloo on the CPU")
    available = dist.is_nccl_available() if backend == CommBackend.NCCL else dist.is_gloo_available()
    if not available:
        raise ConfigError(f"this torch build has no {backend.value} backend")
    return backend


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r runs on the r-th CUDA device after the one asked for; CPU ranks share the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def check_devices(device: torch.device, tp: int) -> None:
    if device.type == "cuda" and (device.index or 0) + tp > torch.cuda.device_count():
        raise ConfigError(f"--tp-size {tp} needs {tp} CUDA devices from {device}; torch sees "
                          f"{torch.cuda.device_count()}")


class Communicator:
    """The all-reduce the sharded layers call, over the group joined by `join()`."""

    def __init__(self, rank: int, world_size: int, backend: CommBackend, port: int,
                 timeout_s: float) -> None:
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.timeout = timedelta(seconds=timeout_s)
        # rank 0 serves the store; the others connect to it
        self.store = dist.TCPStore(HOST, port, world_size, is_master=rank == 0,
                                   timeout=self.timeout, wait_for_workers=False)
        self.port = self.store.port

    def join(self) -> None:
        """Blocks until every rank has joined the group."""
        if dist.is_initialized():
            raise ConfigError("this process already holds a torch.distributed group; "
                              "one tensor-parallel engine per process")
        if self.backend == CommBackend.NCCL:
            # NVLink multicast (NVLS) stays off unless set otherwise: on shared GPU hosts it
            # can take the GPUs out of service; NCCL reads this when it creates the communicator
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        dist.init_process_group(self.backend.value, store=self.store, rank=self.rank,
                                world_size=self.world_size, timeout=self.timeout)
        log.info("tensor-parallel rank %d of %d joined (%s)", self.rank, self.world_size,
                 self.backend.value)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the ranks (in place when x is contiguous) and returns it."""
        x = x.contiguous()
        dist.all_reduce(x)
        return x

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
