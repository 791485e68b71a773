"""The only reader of os.environ: every KTENGINE_* variable, typed, with its default.

Functions, not module constants, so a test can set a variable and see it take effect.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _get(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def cache_dir() -> Path:
    """Where the demo model and packed CPU weights are cached.

    KTENGINE_CACHE_DIR, else $XDG_CACHE_HOME/ktengine, else ~/.cache/ktengine.
    """
    explicit = _get("KTENGINE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = _get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ktengine"


def cpu_kernel_path() -> str:
    """KTENGINE_CPU_KERNEL_PATH: auto (default), generic, avx512 or amx; forces a kernel path."""
    return (_get("KTENGINE_CPU_KERNEL_PATH") or "auto").lower()


def num_cpu_threads() -> int | None:
    """KTENGINE_NUM_CPU_THREADS: worker threads of the CPU expert kernels (None: physical cores)."""
    value = _get("KTENGINE_NUM_CPU_THREADS")
    return int(value) if value else None


def cpu_spin_us() -> int:
    """KTENGINE_CPU_SPIN_US: how long an idle CPU expert worker spins before it sleeps (default
    100 us; a sleeping worker takes tens of microseconds to wake)."""
    value = _get("KTENGINE_CPU_SPIN_US")
    return int(value) if value else 100


def cpu_hold_hot() -> bool:
    """KTENGINE_CPU_HOLD_HOT=0: during a CUDA graph step the CPU experts' workers sleep between
    layers after their spin, instead of staying awake for the whole step (default 1)."""
    return (_get("KTENGINE_CPU_HOLD_HOT") or "1") != "0"


def cpu_caller_helps() -> bool:
    """KTENGINE_CPU_CALLER_HELPS=0: a thread waiting for the CPU experts (the graph steps'
    dispatcher, or the model thread in eager steps) only waits, instead of computing beside
    the workers when they leave it a core (default 1)."""
    return (_get("KTENGINE_CPU_CALLER_HELPS") or "1") != "0"


def expert_distribution_dir() -> Path:
    """KTENGINE_EXPERT_DISTRIBUTION_RECORDER_DIR, else the system temp directory."""
    value = _get("KTENGINE_EXPERT_DISTRIBUTION_RECORDER_DIR")
    return Path(value) if value else Path(tempfile.gettempdir())


def log_level() -> str:
    """KTENGINE_LOG_LEVEL: a logging level name (default INFO)."""
    return (_get("KTENGINE_LOG_LEVEL") or "INFO").upper()


def torch_threads_set_by_user() -> bool:
    """True if OMP_NUM_THREADS is set: then torch's intra-op thread count is left alone."""
    return _get("OMP_NUM_THREADS") is not None


def graph_cpu_sync() -> str:
    """KTENGINE_GRAPH_CPU_SYNC: how a CUDA graph step hands MoE layers to the CPU experts,
    through flags in pinned memory that a dispatcher thread spins on: kernels (default: the
    flags written and awaited by two Triton kernels per layer, moe/handoff_triton.py), flags
    (written and awaited by stream memory operations, with copy-engine copies) or host (two
    CUDA host functions per layer, no dispatcher)."""
    value = (_get("KTENGINE_GRAPH_CPU_SYNC") or "kernels").lower()
    if value not in ("flags", "kernels", "host"):
        raise ValueError(f"KTENGINE_GRAPH_CPU_SYNC must be flags, kernels or host, got {value!r}")
    return value


def fused_moe() -> bool:
    """KTENGINE_FUSED_MOE: 1 (default) runs the GPU experts with the Triton kernel where it
    applies (moe/fused_moe_triton.py); 0 forces the torch paths, to compare the two."""
    return _switch("KTENGINE_FUSED_MOE")


def triton_interpreter() -> bool:
    """True if TRITON_INTERPRET=1: Triton kernels run on the CPU (tests)."""
    return _get("TRITON_INTERPRET") == "1"


def _switch(name: str) -> bool:
    value = (_get(name) or "1").lower()
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def triton_router() -> bool:
    """KTENGINE_TRITON_ROUTER: 1 (default) takes a MoE layer's softmax, top-k and
    renormalisation on CUDA in one Triton kernel (moe/router_triton.py); 0 keeps torch's ops."""
    return _switch("KTENGINE_TRITON_ROUTER")


def triton_decode_attention() -> bool:
    """KTENGINE_TRITON_DECODE_ATTENTION: 1 (default) runs fixed-shape decode attention on CUDA
    with the Triton paged kernel (model/decode_attention_triton.py); 0 gathers the keys and
    calls torch's scaled_dot_product_attention."""
    return _switch("KTENGINE_TRITON_DECODE_ATTENTION")
