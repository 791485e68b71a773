"""The processes of a tensor-parallel engine: rank 0 (this process) and its workers.

Rank 0 owns the scheduler, tokenizer, sampler and AsyncEngine. Each step it pickles the
step's inputs (StepInputs: plain lists) once and writes them down one socket per worker;
every rank builds the same tensors on its own device and runs its share of the forward pass,
the all-reduces keep them in step, and only rank 0 computes logits and samples.

Startup: rank 0 serves the rendezvous store, starts ranks 1..N-1 as fresh interpreters, and
every rank loads the whole checkpoint on the host and keeps its slices (shard.py). A
worker reports "loaded" or its error down its socket; a worker that dies closes its socket,
so rank 0 notices at once and never waits on it. Then all
ranks join the process group.

Shutdown and failure: an empty message stops a worker; one that does not stop is
terminated, then killed. A worker whose parent dies reads EOF from its socket (or its
collective fails) and exits. A worker that fails in a step sends its error and exits; rank 0's
collective then fails (gloo notices the closed connection; NCCL by its timeout), and the
step's requests fail with the worker's message. After any failed step the group is out of
step, so every later step fails at once with the first error.
"""
from __future__ import annotations

import logging
import pickle
import socket
import subprocess
import sys
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch

from ktengine.config import EngineConfig, ModelConfig
from ktengine.errors import ConfigError, KtengineError
from ktengine.model.decoder import MoEForCausalLM
from ktengine.model.loader import load_model
from ktengine.model_runner import StepInputs, step_tensors
from ktengine.moe.hybrid import HybridSetup, build_hybrid
from ktengine.parallel.comm import Communicator, check_devices, rank_device, resolve_backend
from ktengine.parallel.shard import (
    check_shardable,
    expert_slicer,
    install_expert_shards,
    local_kv_heads,
    shard_model,
)

log = logging.getLogger(__name__)

STOP = b""  # the message that ends a worker
JOIN_TIMEOUT_S = 10.0  # a stopped worker gets this long to exit before it is terminated
REPORT_TIMEOUT_S = 2.0  # after a failed step, how long rank 0 waits for a worker's own report


class TensorParallelError(KtengineError):
    """A tensor-parallel rank failed or exited."""


def check_tensor_parallel(config: EngineConfig, model_config: ModelConfig,
                          device: torch.device) -> None:
    """One-line ConfigErrors for a tensor-parallel setup this build cannot run."""
    tp = config.parallel.tp_size
    check_shardable(model_config, tp)
    check_devices(device, tp)
    resolve_backend(config.parallel, device)
    if config.placement.dynamic_update:
        raise ConfigError("dynamic expert update does not support --tp-size > 1 yet "
                          "(every rank would have to swap its slice in step)")


def load_rank(config: EngineConfig, model_dir: Path, model_config: ModelConfig,
              mask: torch.Tensor, device: torch.device, comm: Communicator,
              progress: bool) -> tuple[MoEForCausalLM, HybridSetup | None]:
    """Loads the whole checkpoint on the host and keeps this rank's slices on `device`.

    Rank 0 gets the hybrid executor (all experts packed for the CPU, its slice of the
    resident ones in GPU slots); the other ranks get only their slice of the resident ones.
    """
    rank, tp = comm.rank, comm.world_size
    model = load_model(model_dir, model_config, torch.device("cpu"), progress=progress)
    shard_model(model, rank, tp, comm.all_reduce)
    hybrid = None
    if rank == 0:
        hybrid = build_hybrid(model, model_config, config.moe, mask, device,
                              keep_host_weights=False, progress=progress,
                              slot_weights=expert_slicer(model_config, rank, tp))
    else:
        install_expert_shards(model, mask, rank, tp, device)
    return model.to(device), hybrid


class WorkerPool:
    """Rank 0's handle on ranks 1..N-1: start, send steps, notice failures, stop.

    Workers are fresh interpreters (`python -m ktengine.parallel.workers FD`), not
    multiprocessing children, so a user's script is never re-imported in them; each talks
    to rank 0 over its own socket pair, which also tells either side when the other is gone.
    """

    def __init__(self, config: EngineConfig, model_dir: Path, mask: torch.Tensor,
                 device: torch.device) -> None:
        parallel = self.parallel = config.parallel
        self.comm = Communicator(0, parallel.tp_size, resolve_backend(parallel, device), 0,
                                 parallel.timeout_s)
        self.error: str | None = None  # the first failure; every later step fails with it
        self.joined = False  # every rank is in the group (until then, close() need not wait)
        self.conns: list[Connection] = []
        self.procs: list[subprocess.Popen] = []
        try:
            for rank in range(1, parallel.tp_size):
                ours, theirs = socket.socketpair()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "ktengine.parallel.workers", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
                theirs.close()
                self.procs.append(proc)
                self.conns.append(Connection(ours.detach()))
                self.conns[-1].send((rank, config, str(model_dir), mask.tolist(), self.comm.port))
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def wait_loaded(self) -> None:
        """Returns when every worker has loaded its shard; raises at the first that fails
        (a worker that dies closes its socket, which wakes this wait too)."""
        pending = dict(enumerate(self.conns, start=1))
        while pending:
            for conn in wait(list(pending.values())):
                rank = next(r for r, c in pending.items() if c is conn)
                message = self._receive(rank)
                if message != "loaded":
                    raise TensorParallelError(f"tensor-parallel rank {rank} failed to start: "
                                              f"{message}")
                del pending[rank]

    def send(self, plan: StepInputs) -> None:
        data = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError:
                raise self.fail(f"tensor-parallel rank {rank} is gone "
                                f"({self._receive(rank)})") from None

    def check(self) -> None:
        """Raises the first failure, or a worker's exit, before a step starts."""
        if self.error is None:
            for rank, proc in enumerate(self.procs, start=1):
                if proc.poll() is not None:
                    self.fail(f"tensor-parallel rank {rank} {self._receive(rank)}")
                    break
        if self.error is not None:
            raise TensorParallelError(self.error)

    def fail(self, message: str) -> TensorParallelError:
        """Records the group's first failure; returns the error to raise."""
        if self.error is None:
            self.error = message
        return TensorParallelError(self.error)

    def failure(self, exc: BaseException) -> TensorParallelError:
        """The error of a step that raised on rank 0: a worker's own report when one comes
        (its death is what broke rank 0's collective), else rank 0's error."""
        if self.error is not None:
            return TensorParallelError(self.error)
        if wait(self.conns, timeout=REPORT_TIMEOUT_S):  # a report, or a closed socket
            for rank, conn in enumerate(self.conns, start=1):
                if conn.poll():
                    return self.fail(f"tensor-parallel rank {rank} {self._receive(rank)}")
        return self.fail(f"tensor-parallel rank 0 failed: {type(exc).__name__}: {exc}")

    def _receive(self, rank: int) -> str:
        """A worker's last word: "loaded", "failed: <error>", or how it exited."""
        conn, proc = self.conns[rank - 1], self.procs[rank - 1]
        try:
            if conn.poll(0.5):
                kind, text = conn.recv()
                return "loaded" if kind == "loaded" else f"failed: {text}"
        except (EOFError, OSError):
            pass
        try:
            return f"exited with code {proc.wait(1.0)}"
        except subprocess.TimeoutExpired:
            return "stopped answering"

    def close(self) -> None:
        """Stops every worker (waits, then terminates, then kills) and leaves the group."""
        for conn in self.conns:
            try:
                conn.send_bytes(STOP)
            except OSError:
                pass
        for rank, proc in enumerate(self.procs, start=1):
            if not self.joined or self.error is not None:
                proc.terminate()  # loading, or stuck in a collective of a failed step
            try:
                proc.wait(JOIN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("tensor-parallel rank %d did not stop; terminating it", rank)
                proc.terminate()
                try:
                    proc.wait(JOIN_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []
        self.comm.close()


def load_tensor_parallel(config: EngineConfig, model_dir: Path, model_config: ModelConfig,
                         mask: torch.Tensor, device: torch.device, progress: bool):
    """Rank 0's start-up: spawns the workers, loads its own shard, joins the group.

    Returns (model, hybrid, kv cache, max model length, workers).
    """
    from ktengine.startup import build_kv_cache

    check_tensor_parallel(config, model_config, device)
    tp = config.parallel.tp_size
    log.info("tensor parallel: %d ranks (%s), rank 0 on %s", tp,
             resolve_backend(config.parallel, device).value, device)
    workers = WorkerPool(config, model_dir, mask, device)  # they load while this rank does
    try:
        model, hybrid = load_rank(config, model_dir, model_config, mask, device, workers.comm,
                                  progress)
        kv, max_model_len = build_kv_cache(config, model_config, device,
                                           local_kv_heads(model_config, tp))
        workers.wait_loaded()
        workers.comm.join()
        workers.joined = True
    except BaseException:
        workers.close()
        raise
    return model, hybrid, kv, max_model_len, workers


def worker_main(conn: Connection) -> None:
    """Rank > 0: load this rank's shard, then run every step rank 0 sends until told to stop."""
    from ktengine.startup import build_kv_cache, resolve_device, resolve_model_config
    from ktengine.state_cache import layer_caches

    try:
        rank, config, model_dir, mask, port = conn.recv()
        device = rank_device(resolve_device(config.device), rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        comm = Communicator(rank, config.parallel.tp_size, resolve_backend(config.parallel, device),
                            port, config.parallel.timeout_s)
        model_config = resolve_model_config(config, Path(model_dir))
        model, _ = load_rank(config, Path(model_dir), model_config,
                             torch.tensor(mask, dtype=torch.bool), device, comm, progress=False)
        kv, _ = build_kv_cache(config, model_config, device,
                               local_kv_heads(model_config, config.parallel.tp_size))
        caches = layer_caches(model_config, kv.layers, kv.state)
        conn.send(("loaded", None))
        comm.join()
    except EOFError:  # rank 0 is gone
        return
    except BaseException as exc:  # noqa: BLE001 (reported to rank 0, which raises it)
        _report(conn, exc)
        return
    try:
        _serve(conn, model, caches, device)
    except BaseException as exc:  # noqa: BLE001
        _report(conn, exc)
    finally:
        comm.close()


def _serve(conn: Connection, model: MoEForCausalLM, caches: list, device: torch.device) -> None:
    window = model.config.sliding_window
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:  # rank 0 is gone
            return
        if data == STOP:
            return
        plan: StepInputs = pickle.loads(data)
        ids, meta, rows = step_tensors(plan, window, device)
        model(ids, meta, caches, rows[:0])  # rank 0 alone computes logits


def _report(conn: Connection, exc: BaseException) -> None:
    """Sends rank 0 one line; the traceback goes to this process's stderr."""
    if not isinstance(exc, KtengineError):
        log.error("tensor-parallel worker failed", exc_info=exc)
    try:
        conn.send(("error", f"{type(exc).__name__}: {exc}".splitlines()[0]))
    except OSError:
        pass


if __name__ == "__main__":  # python -m ktengine.parallel.workers FD (started by WorkerPool)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker_main(Connection(int(sys.argv[1])))
