"""CPU-resident routed experts: packed weights and the fused MoE call over ktengine_ext.

One `CpuExpertStore` holds one MoE layer's experts, packed once into the kernel's layout
(fp32, bf16, int8 per output channel, int4 per group), and computes
    out[t] = sum_j w[t, j] * down_e(silu(gate_e x_t) * up_e x_t),  e = topk_ids[t, j],
over the experts the GPU mask row marks as CPU-resident, on the extension's own worker threads
with the GIL released. `submit()` starts that work and returns; `sync()` waits for it.
"""
from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from ktengine import env
from ktengine.errors import ConfigError
from ktengine.options import MAX_CPU_THREADS
from ktengine_ext import CPU_FEATURES, _moe

_FORMAT_VERSION = 1
_BUFFERS = ("gu_w", "gu_s", "gu_z", "down_w", "down_s", "down_z")
_SRC_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_X_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class WeightFormat(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "int8"
    INT4 = "int4"


# Experts with at least this many tokens in a call use AMX (when the path allows it), by
# format: int4's AMX kernel unpacks each panel pair and scales each group's C tiles, which
# pays from about 16 tokens per expert. Measured with bench/cpu_experts.py --sweep-amx; see
# docs/cpu_kernels.md.
DEFAULT_AMX_MIN_TOKENS = 4
AMX_MIN_TOKENS = {WeightFormat.INT4: 16}


def default_amx_min_tokens(fmt: WeightFormat | str) -> int:
    return AMX_MIN_TOKENS.get(WeightFormat(fmt), DEFAULT_AMX_MIN_TOKENS)


class KernelPath(str, enum.Enum):
    GENERIC = "generic"
    AVX512 = "avx512"
    AMX = "amx"


_FMT_CODE = {WeightFormat.FP32: 0, WeightFormat.BF16: 1, WeightFormat.INT8: 2, WeightFormat.INT4: 3}
_PATH_CODE = {KernelPath.GENERIC: 0, KernelPath.AVX512: 1, KernelPath.AMX: 2}
_AVX512_SETS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")
_AMX_SETS = _AVX512_SETS + ("amx_tile", "amx_bf16", "amx_int8")


def available_paths() -> list[KernelPath]:
    """The kernel paths this CPU (and OS, for AMX) can run, generic first."""
    paths = [KernelPath.GENERIC]
    if all(CPU_FEATURES.get(name) for name in _AVX512_SETS):
        paths.append(KernelPath.AVX512)
    if all(CPU_FEATURES.get(name) for name in _AMX_SETS):
        paths.append(KernelPath.AMX)
    return paths


def resolve_path(requested: str | None = None) -> KernelPath:
    """'auto' (or None: env.cpu_kernel_path()) -> the best available path; a forced path must exist."""
    requested = (requested or env.cpu_kernel_path()).lower()
    paths = available_paths()
    if requested == "auto":
        return paths[-1]
    path = KernelPath(requested)
    if path not in paths:
        raise ValueError(f"CPU kernel path {path.value!r} is not supported by this CPU "
                         f"(available: {[p.value for p in paths]})")
    return path


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    allowed = os.sched_getaffinity(0)
    cores = set()
    for cpu in allowed:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(),
                       (topo / "core_id").read_text().strip()))
        except OSError:
            return len(allowed)
    return max(1, len(cores))


def default_num_threads(reserved: int = 1) -> int:
    """Physical cores, less `reserved` for other busy threads when there are 4 or more."""
    cores = physical_cores()
    return max(1, cores - reserved) if cores >= 4 else cores


class CpuThreadPool:
    """Owns the extension's worker threads; every CpuExpertStore of an engine shares one."""

    def __init__(self, num_threads: int | None = None, spin_us: int | None = None,
                 reserved_cores: int = 1, caller_helps: bool | None = None) -> None:
        # Default: one core left to the Python/CUDA driver thread on machines of 4+ cores
        # (a CUDA engine leaves two: its graph steps' dispatcher thread spins too).
        # Measured on 16 cores (docs/cpu_kernels.md): decode T=1 bf16 takes 0.74-0.87 ms with
        # 15 workers and 1.06-1.81 ms with 16, which must share a core with the caller.
        if num_threads is not None and not 1 <= num_threads <= MAX_CPU_THREADS:
            raise ConfigError(f"--kt-cpuinfer must be between 1 and {MAX_CPU_THREADS}, got {num_threads}")
        self.num_threads = num_threads or env.num_cpu_threads() or default_num_threads(reserved_cores)
        self._pool = _moe.ThreadPool(self.num_threads, env.cpu_spin_us() if spin_us is None else spin_us)
        self.caller_helps = env.cpu_caller_helps() if caller_helps is None else caller_helps

    @property
    def caller_helps(self) -> bool:
        """Whether the thread that waits for a call (sync) computes beside the workers, as one
        more: only when they leave a core free (reserved_cores). The same bits either way.
        Measured on the 16-core H200 host (14 workers, 8 layers, docs/cpu_kernels.md): graph
        decode steps 5-12% faster at ratio 0.5, a tie at ratio 0 and batch 1."""
        return self._pool.caller_helps

    @caller_helps.setter
    def caller_helps(self, on: bool) -> None:
        self._pool.caller_helps = on

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> CpuThreadPool:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CpuExpertStore:
    """One MoE layer's experts, packed for the CPU kernels.

    gate, up: [E, I, H]; down: [E, H, I] (Hugging Face out x in), fp32/bf16/fp16. int4 uses
    groups of `group_size` (32, 64, 128) along the input dim, symmetric unless `asymmetric`.
    `path`: 'auto', 'generic', 'avx512' or 'amx' (None: env.cpu_kernel_path()). With the amx
    path, experts that get at least `amx_min_tokens` tokens in a call (None: the format's
    default_amx_min_tokens) use AMX (bf16, int8, int4 with groups of 64 or 128), the others
    the AVX512 kernels.
    """

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 fmt: WeightFormat | str, pool: CpuThreadPool, group_size: int = 64,
                 path: str | None = None, *, asymmetric: bool = False,
                 amx_min_tokens: int | None = None) -> None:
        E, I, H = gate.shape
        if up.shape != (E, I, H) or down.shape != (E, H, I):
            raise ValueError(f"expected gate/up [E, I, H] and down [E, H, I], got "
                             f"{tuple(gate.shape)}, {tuple(up.shape)}, {tuple(down.shape)}")
        self._init_meta(WeightFormat(fmt), pool, E, H, I, group_size, asymmetric)
        src = [t.detach().to("cpu").contiguous() for t in (gate, up, down)]
        dtype = src[0].dtype if src[0].dtype in _SRC_DTYPES else torch.float32
        src = [t.to(dtype) for t in src]
        self._buffers = self._alloc_buffers()
        _moe.pack_layer(pool._pool, _FMT_CODE[self.fmt], self.group_size, int(asymmetric), E, H, I,
                        self._ptrs(), src[0].data_ptr(), src[1].data_ptr(), src[2].data_ptr(),
                        _SRC_DTYPES[dtype])
        self._init_task(path, amx_min_tokens)

    def _init_meta(self, fmt: WeightFormat, pool: CpuThreadPool, E: int, H: int, I: int,
                   group_size: int, asymmetric: bool) -> None:
        if fmt is WeightFormat.INT4 and group_size not in (32, 64, 128):
            raise ValueError(f"int4 group_size must be 32, 64 or 128, got {group_size}")
        self.fmt = fmt
        self.pool = pool
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, I
        self.group_size = group_size
        self.asymmetric = asymmetric and fmt is WeightFormat.INT4
        self._layout = _moe.layout(_FMT_CODE[fmt], group_size, int(self.asymmetric), E, H, I)
        self._inflight: tuple | None = None

    def _alloc_buffers(self) -> dict[str, torch.Tensor]:
        # torch's CPU allocator aligns to 64 bytes; every per-expert size is a multiple of 64.
        # Weights get 2 MiB pages where the kernel grants them (advised before the first
        # touch): AMX streams them with tile loads, which page walks on 4 KiB pages slow down.
        E = self.num_experts
        buffers = {}
        for name in _BUFFERS:
            buf = torch.empty(max(E * self._layout[name], 64), dtype=torch.uint8)
            _moe.advise_huge_pages(buf.data_ptr(), buf.numel())
            buffers[name] = buf.zero_()
        return buffers

    def _ptrs(self) -> tuple[int, ...]:
        return tuple(self._buffers[name].data_ptr() for name in _BUFFERS)

    def _init_task(self, path: str | None, amx_min_tokens: int | None) -> None:
        self.path = resolve_path(path)
        if amx_min_tokens is None:
            amx_min_tokens = default_amx_min_tokens(self.fmt)
        self._task = _moe.MoeTask(self.pool._pool, _FMT_CODE[self.fmt], self.group_size,
                                  int(self.asymmetric), self.num_experts, self.hidden_size,
                                  self.intermediate_size, self._ptrs(), _PATH_CODE[self.path],
                                  amx_min_tokens)

    @property
    def amx_min_tokens(self) -> int:
        return self._task.amx_min_tokens

    @amx_min_tokens.setter
    def amx_min_tokens(self, value: int) -> None:
        self._task.amx_min_tokens = value

    @property
    def nbytes(self) -> int:
        """Packed bytes (weights, scales, sums) of all experts."""
        return sum(self.num_experts * self._layout[name] for name in _BUFFERS)

    def expert_nbytes(self) -> int:
        """Packed bytes one expert's call reads (what decode streams from RAM)."""
        return sum(self._layout[name] for name in _BUFFERS)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                gpu_mask_row: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H] bf16/fp32, topk_ids [T, k], topk_weights [T, k] -> out [T, H], x's dtype."""
        self.submit(x, topk_ids, topk_weights, gpu_mask_row, out)
        return self.sync()

    __call__ = forward

    def submit(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
               gpu_mask_row: torch.Tensor | None = None, out: torch.Tensor | None = None) -> None:
        """Starts the call on the worker threads and returns at once; sync() gives the result.

        gpu_mask_row: bool [E] on the CPU, True = on the GPU (skipped); read at this call.
        """
        if self._inflight is not None:
            raise RuntimeError("submit() called twice without sync()")
        T, H = x.shape
        if H != self.hidden_size:
            raise ValueError(f"x has hidden size {H}, the experts {self.hidden_size}")
        out_dtype = x.dtype
        if x.dtype not in _X_DTYPES:
            x = x.float()
        x = x.contiguous()
        ids = topk_ids.contiguous()
        if ids.dtype not in (torch.int32, torch.int64):
            ids = ids.long()
        weights = topk_weights.to(torch.float32).contiguous()
        if ids.shape != weights.shape or ids.shape[0] != T:
            raise ValueError(f"topk_ids {tuple(ids.shape)} and topk_weights "
                             f"{tuple(weights.shape)} must both be [T={T}, k]")
        mask_ptr = 0
        if gpu_mask_row is not None:
            if gpu_mask_row.dtype != torch.bool or gpu_mask_row.numel() != self.num_experts:
                raise ValueError(f"gpu_mask_row must be bool [{self.num_experts}]")
            if not gpu_mask_row.is_contiguous() or gpu_mask_row.device.type != "cpu":
                raise ValueError("gpu_mask_row must be a contiguous CPU tensor")
            mask_ptr = gpu_mask_row.data_ptr()
        result = out if out is not None and out.dtype == x.dtype else None
        if result is None:
            result = torch.empty((T, H), dtype=x.dtype)
        elif not result.is_contiguous() or result.shape != (T, H):
            raise ValueError(f"out must be a contiguous [{T}, {H}] tensor")
        k = ids.shape[1] if ids.dim() == 2 else 0
        self._task.submit(x.data_ptr(), _X_DTYPES[x.dtype], T, k, ids.data_ptr(),
                          ids.dtype == torch.int64, weights.data_ptr(), mask_ptr, result.data_ptr())
        # keep every buffer the workers read alive until sync()
        self._inflight = (x, ids, weights, gpu_mask_row, result, out, out_dtype)

    def sync(self) -> torch.Tensor:
        """Waits for the call started by submit(); returns its output [T, H]."""
        if self._inflight is None:
            raise RuntimeError("sync() without submit()")
        self._task.sync()
        _, _, _, _, result, out, out_dtype = self._inflight
        self._inflight = None
        if result.dtype != out_dtype:
            result = result.to(out_dtype)
        if out is not None and out.data_ptr() != result.data_ptr():
            out.copy_(result)
            return out
        return result

    def bind(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
             gpu_mask_row: torch.Tensor, out: torch.Tensor, live_tokens: torch.Tensor) -> BoundCall:
        """A call with fixed buffers, made by C callers (CUDA host functions) through
        `host_functions()`: x [T, H] bf16/fp32, topk_ids [T, k] int64, topk_weights [T, k] fp32,
        out [T, H] like x, all contiguous host tensors; live_tokens int32 [1]: each call
        computes its first min(live_tokens[0], T) rows. The tensors must outlive the calls."""
        T, k = topk_ids.shape
        if (x.dtype not in _X_DTYPES or out.dtype != x.dtype or x.shape != (T, self.hidden_size)
                or out.shape != x.shape or topk_ids.dtype != torch.int64
                or topk_weights.dtype != torch.float32 or topk_weights.shape != (T, k)
                or gpu_mask_row.dtype != torch.bool or gpu_mask_row.numel() != self.num_experts
                or live_tokens.dtype != torch.int32):
            raise ValueError("bind(): buffers of the wrong dtype or shape")
        tensors = (x, topk_ids, topk_weights, gpu_mask_row, out, live_tokens)
        if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
            raise ValueError("bind(): buffers must be contiguous host tensors")
        task = self._task.clone()
        task.bind(x.data_ptr(), _X_DTYPES[x.dtype], T, k, topk_ids.data_ptr(), True,
                  topk_weights.data_ptr(), gpu_mask_row.data_ptr(), out.data_ptr(),
                  live_tokens.data_ptr())
        return BoundCall(task, tensors)

    def save(self, file: str | os.PathLike | BinaryIO) -> None:
        """Writes the packed weights, so a later start skips packing (load())."""
        torch.save({
            "version": _FORMAT_VERSION, "fmt": self.fmt.value, "num_experts": self.num_experts,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "group_size": self.group_size, "asymmetric": self.asymmetric,
            "buffers": self._buffers,
        }, file)

    @classmethod
    def load(cls, file: str | os.PathLike | BinaryIO, pool: CpuThreadPool,
             path: str | None = None, *,
             amx_min_tokens: int | None = None) -> CpuExpertStore:
        """Reads what save() wrote."""
        state = torch.load(file, weights_only=True)
        if state.get("version") != _FORMAT_VERSION:
            raise ValueError(f"packed experts version {state.get('version')}, "
                             f"expected {_FORMAT_VERSION}")
        self = cls.__new__(cls)
        self._init_meta(WeightFormat(state["fmt"]), pool, state["num_experts"],
                        state["hidden_size"], state["intermediate_size"], state["group_size"],
                        state["asymmetric"])
        buffers = self._alloc_buffers()
        for name in _BUFFERS:
            if buffers[name].shape != state["buffers"][name].shape:
                raise ValueError(f"packed buffer {name} has the wrong size")
            buffers[name].copy_(state["buffers"][name])  # fresh 64-byte aligned storage
        self._buffers = buffers
        self._init_task(path, amx_min_tokens)
        return self

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weights as packed (after quantization), fp32: gate, up [E, I, H], down [E, H, I]."""
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        gate = torch.empty((E, I, H))
        up = torch.empty((E, I, H))
        down = torch.empty((E, H, I))
        for e in range(E):
            _moe.dequant_expert(_FMT_CODE[self.fmt], self.group_size, int(self.asymmetric), E, H,
                                I, self._ptrs(), e, gate[e].data_ptr(), up[e].data_ptr(),
                                down[e].data_ptr())
        return gate, up, down


class BoundCall:
    """A fused call with fixed buffers (CpuExpertStore.bind); `address` is the C task."""

    def __init__(self, task, tensors: tuple) -> None:
        self._task = task
        self._tensors = tensors  # alive as long as the task may read them
        self.address = task.address

    @property
    def ok(self) -> bool:
        """Whether the last call through `address` started (False: out of memory, or none yet)."""
        return self._task.status == 0


def host_functions() -> tuple[int, int]:
    """(submit, sync): C functions void fn(void *task) taking a BoundCall's address."""
    return _moe.host_function_addresses()


def pack_model_experts(layers: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                       fmt: WeightFormat | str, pool: CpuThreadPool, group_size: int = 64,
                       path: str | None = None, cache_dir: str | os.PathLike | None = None,
                       num_layers: int | None = None) -> list[CpuExpertStore]:
    """Packs every MoE layer's (gate, up, down), with a progress bar.

    With cache_dir, layer i is read from `cache_dir/layer{i}.{fmt}.pt` when that file exists
    (and written there after packing otherwise), so the next start skips packing. `layers`
    may be a generator that loads each layer's tensors lazily.
    """
    from tqdm import tqdm

    fmt = WeightFormat(fmt)
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    stores: list[CpuExpertStore] = []
    total = num_layers if num_layers is not None else (
        len(layers) if isinstance(layers, Sequence) else None)
    for i, (gate, up, down) in enumerate(tqdm(layers, total=total, desc=f"packing experts ({fmt.value})",
                                              unit="layer")):
        file = cache / f"layer{i}.{fmt.value}.g{group_size}.pt" if cache is not None else None
        if file is not None and file.exists():
            stores.append(CpuExpertStore.load(file, pool, path))
            continue
        store = CpuExpertStore(gate, up, down, fmt, pool, group_size, path)
        if file is not None:
            tmp = file.with_suffix(".tmp")
            store.save(tmp)
            tmp.replace(file)
        stores.append(store)
    return stores
