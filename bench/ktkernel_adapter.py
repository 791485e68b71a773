"""kt-kernel (PyPI `kt-kernel`, the CPU MoE kernels of KTransformers) on bench/cpu_experts.py's shapes.

kt-kernel chooses its ISA variant once, when it is imported (KT_KERNEL_CPU_VARIANT), and its
CPUInfer worker threads would compete with ktengine's pool for the same cores, so each variant
runs in a child process of the same interpreter, one per (variant, shape):

    python bench/ktkernel_adapter.py --variant amx --shape qwen3-30b-a3b --formats bf16,int8 \
        --threads 2 --out rows.json

bench/cpu_experts.py starts these children and merges their rows into its own results. Nothing
here asserts; a failure is one printed line.

How kt-kernel 0.7.2 is driven (its own Python-visible API, the one its tests and its
KTMoEWrapper use, minus the GPU staging buffers of KTMoEWrapper.forward):

    cpu = kt_kernel_ext.CPUInfer(threads)               # WorkerPool of `threads` workers
    cfg = kt_kernel_ext.moe.MOEConfig(E, k, H, I, 0)    # 0: no GPU-expert mask
    cfg.max_len = 2048                                  # largest T of a call (buffers sized by it)
    cfg.gate_proj, cfg.up_proj, cfg.down_proj = ptrs    # bf16 [E,I,H], [E,I,H], [E,H,I]
    cfg.gate_scale = cfg.up_scale = cfg.down_scale = 0
    cfg.pool = cpu.backend_
    moe = kt_kernel_ext.moe.AMXBF16_MOE(cfg)            # AMXInt8_MOE / AMXInt4_MOE: quantized
    cpu.submit(moe.load_weights_task(arange(E).ptr))    #   online from the bf16 tensors
    cpu.sync()
    cpu.submit(moe.forward_task(bsz_int32_ptr, k, ids_int64_ptr, weights_fp32_ptr,
                                x_bf16_ptr, out_bf16_ptr, False))
    cpu.sync()

Variants: 'amx' loads _kt_kernel_ext_amx (AMX tiles for prefill), 'avx512' loads
_kt_kernel_ext_avx512_bf16 (same classes, AVX512-BF16/VNNI kernels). Note that
KT_KERNEL_CPU_VARIANT=avx512 is not a value kt-kernel knows: it silently falls back to CPU
detection, i.e. AMX on an AMX machine; the value is 'avx512_bf16'.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ENV_VARIANT = {"amx": "amx", "avx512": "avx512_bf16"}
CLASSES = {"bf16": "AMXBF16_MOE", "int8": "AMXInt8_MOE", "int4": "AMXInt4_MOE"}
FORMATS = tuple(CLASSES)
# bytes per weight; int8/int4 are quantized per output channel with one fp32 scale per row
_WEIGHT_BYTES = {"bf16": 2.0, "int8": 1.0, "int4": 0.5}


def expert_nbytes(fmt: str, H: int, I: int) -> int:
    """Nominal bytes of one kt-kernel expert (weights + per-row scales): what decode streams."""
    scales = 0 if fmt == "bf16" else 4 * (2 * I + H)
    return int(3 * H * I * _WEIGHT_BYTES[fmt]) + scales


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class KtLayer:
    """One kt-kernel MoE layer built from bf16 gate/up/down; forward() like CpuExpertStore's."""

    def __init__(self, ext, cpu, fmt: str, gate, up, down, k: int, max_len: int) -> None:
        import torch

        E, I, H = gate.shape
        self.cpu, self.k, self.hidden = cpu, k, H
        self._src = [t.contiguous() for t in (gate, up, down)]  # alive until loaded
        cfg = ext.moe.MOEConfig(E, k, H, I, 0)
        cfg.max_len = max_len
        cfg.gate_proj, cfg.up_proj, cfg.down_proj = (t.data_ptr() for t in self._src)
        cfg.gate_scale = cfg.up_scale = cfg.down_scale = 0
        cfg.pool = cpu.backend_
        self.moe = getattr(ext.moe, CLASSES[fmt])(cfg)
        self._map = torch.arange(E, dtype=torch.int64)
        cpu.submit(self.moe.load_weights_task(self._map.data_ptr()))
        cpu.sync()
        self._src = None
        self._bsz = torch.zeros(1, dtype=torch.int32)

    def forward(self, x, ids, w, out):
        """x [T, H] bf16, ids [T, k] int64, w [T, k] fp32, out [T, H] bf16 (all contiguous)."""
        self._bsz[0] = x.shape[0]
        self.cpu.submit(self.moe.forward_task(self._bsz.data_ptr(), ids.shape[1], ids.data_ptr(),
                                              w.data_ptr(), x.data_ptr(), out.data_ptr(), False))
        self.cpu.sync()
        return out


def check(ext, cpu, fmt: str, impl: str) -> dict:
    """Small case against tests/reference.py (fp32 math on the bf16 weights)."""
    import torch

    from tests.reference import fused_moe_reference

    E, H, I, k = 16, 512, 256, 4
    gen = torch.Generator().manual_seed(5)
    gate, up = (torch.randn(E, I, H, generator=gen).mul_(0.05).bfloat16() for _ in range(2))
    down = torch.randn(E, H, I, generator=gen).mul_(0.05).bfloat16()
    layer = KtLayer(ext, cpu, fmt, gate, up, down, k, max_len=64)
    row = {"impl": impl, "format": fmt, "case": f"E{E} H{H} I{I} k{k}", "class": CLASSES[fmt]}
    for T in (1, 64):
        x = torch.randn(T, H, generator=gen).bfloat16()
        ids = torch.rand(T, E, generator=gen).topk(k, dim=1).indices.contiguous()
        w = torch.rand(T, k, generator=gen)
        out = layer.forward(x, ids, w, torch.zeros(T, H, dtype=torch.bfloat16)).float()
        ref = fused_moe_reference(x, gate, up, down, ids, w)
        row[f"T{T}_max_rel_err"] = ((out - ref).abs().max() / ref.abs().max()).item()
        row[f"T{T}_rel_fro_err"] = ((out - ref).norm() / ref.norm()).item()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=tuple(ENV_VARIANT), required=True)
    parser.add_argument("--shape", required=True)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--tokens", required=True, help="comma-separated T values")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--cold-factor", type=float, default=4.0)
    parser.add_argument("--dram", type=float, required=True, help="GB/s, for the printed lines")
    parser.add_argument("--json", action="store_true", help="print lines to stderr")
    parser.add_argument("--check", action="store_true", help="run the small reference check")
    parser.add_argument("--out", required=True, help="JSON file for the rows")
    parser.add_argument("--verbose", action="store_true", help="keep kt-kernel's own stdout")
    parser.add_argument("--label", default=None, help="impl name on the printed lines")
    parser.add_argument("--zipf", type=float, default=0.0, help="prefill routing skew (cpu_experts.py)")
    args = parser.parse_args()

    os.environ["KT_KERNEL_CPU_VARIANT"] = ENV_VARIANT[args.variant]
    # kt-kernel's C++ prints a few lines per layer to fd 1: send them to /dev/null, keep ours
    if not args.verbose:
        saved = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        sys.stdout = os.fdopen(saved, "w", buffering=1)
    repo = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(repo), str(repo / "bench")]
    import cpu_experts as ce
    ce.ZIPF = args.zipf
    import torch

    ce.ARGS = argparse.Namespace(json=args.json)
    impl = f"kt-kernel-{args.variant}"
    state: dict = {"rows": [], "checks": [], "info": {}}
    out_file = Path(args.out)

    def save() -> None:
        out_file.write_text(json.dumps(state, indent=1))

    try:
        import kt_kernel
        import kt_kernel_ext as ext
    except Exception as exc:  # noqa: BLE001 - reported, never raised
        state["error"] = f"import kt_kernel failed: {exc!r}"
        save()
        return
    state["info"] = {"version": kt_kernel.__version__, "cpu_variant": kt_kernel.__cpu_variant__,
                     "int8_kernel": kt_kernel.__int8_kernel__,
                     "KT_KERNEL_CPU_VARIANT": ENV_VARIANT[args.variant], "threads": args.threads,
                     "torch": torch.__version__}
    torch.set_num_threads(args.threads)
    cpu = ext.CPUInfer(args.threads)
    formats = [f for f in args.formats.split(",") if f in FORMATS]
    if args.check:
        for fmt in formats:
            c = check(ext, cpu, fmt, impl)
            state["checks"].append(c)
            save()
            print(f"{args.label or impl:16s} {fmt:5s} check {c['case']} vs tests/reference.py: max rel err "
                  f"T=1 {c['T1_max_rel_err']:.2e}, T=64 {c['T64_max_rel_err']:.2e} "
                  f"(rel Frobenius {c['T1_rel_fro_err']:.2e}, {c['T64_rel_fro_err']:.2e})",
                  flush=True, file=sys.stderr if args.json else sys.stdout)

    E, H, I, k = ce.SHAPES[args.shape]
    gate, up, down = ce.source_weights(args.shape)
    tokens = [int(t) for t in args.tokens.split(",")]
    for fmt in formats:
        per_expert = expert_nbytes(fmt, H, I)
        num_layers = max(2, math.ceil(args.cold_factor * ce.llc_bytes() / (E * per_expert)))
        rss0, t0 = rss_bytes(), time.perf_counter()
        max_len = -(-max(tokens) // 64) * 64  # kt-kernel wants a multiple of its M step
        try:
            layers = [KtLayer(ext, cpu, fmt, gate, up, down, k, max_len) for _ in range(num_layers)]
        except Exception as exc:  # noqa: BLE001 - one line, then the next format
            print(f"{impl:16s} {fmt:5s} {args.shape}: could not build the layer: {exc}", flush=True,
                  file=sys.stderr if args.json else sys.stdout)
            continue
        load_s = (time.perf_counter() - t0) / num_layers
        rss_per_layer = (rss_bytes() - rss0) / num_layers
        gen = torch.Generator().manual_seed(0)
        for T in tokens:
            calls = []
            for layer, ids, w in ce.cold_calls(T, E, k, num_layers, gen):
                x = torch.randn(T, H).bfloat16()
                calls.append((layers[layer], x, ids.long().contiguous(), w.contiguous(),
                              torch.empty(T, H, dtype=torch.bfloat16)))
            bytes_read = sum(len(torch.unique(c[2])) * per_expert for c in calls) / len(calls)
            sec = ce.time_calls(lambda layer, x, ids, w, out: layer.forward(x, ids, w, out), calls,
                                args.seconds, 3 if T >= 512 else 20)
            row = {"impl": impl, "format": fmt, "shape": args.shape, "tokens": T, "seconds": sec,
                   "gbps": bytes_read / sec / 1e9, "tflops": 6 * H * I * T * k / sec / 1e12,
                   "threads": args.threads, "class": CLASSES[fmt], "layers_cycled": num_layers,
                   "expert_nbytes": per_expert, "rss_bytes_per_layer": rss_per_layer,
                   "load_seconds_per_layer": load_s}
            state["rows"].append(row)
            save()
            ce.report(row | {"impl": args.label or impl}, args.dram)
        del layers, calls


if __name__ == "__main__":
    main()
