"""The placement sweep's report: console rows, the markdown table, the targets, the plot."""
from __future__ import annotations

import itertools
from pathlib import Path

STRATEGIES = ["random", "uniform", "front-loading", "frequency", "dynamic"]
# also runnable (--strategies): dynamic expert update starting from `uniform`
EXTRA_STRATEGIES = ["dynamic-uniform"]
ALL_STRATEGIES = STRATEGIES + EXTRA_STRATEGIES
NOISE = 0.05  # relative difference taken as noise when a cell ran once


def _f(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def print_rows(rows: list[dict], header: bool = False) -> None:
    if header:
        print(f"{'ratio':>5} {'strategy':<14} {'out tok/s':>9} {'GPU share':>9} {'b1 tok/s':>8} "
              f"{'b1 roof':>8} {'b1 %':>5} {'mean B':>6} {'B roof':>8} {'updates':>7} {'cell s':>6}",
              flush=True)
    for r in rows:
        pct = r["b1_decode_tok_s"] / r["b1_roofline_tok_s"] if r["b1_roofline_tok_s"] else None
        print(f"{r['ratio']:>5.2f} {r['strategy']:<14} {r['output_tok_s']:>9.1f} {r['gpu_share']:>9.1%} "
              f"{r['b1_decode_tok_s']:>8.1f} {r['b1_roofline_tok_s']:>8.1f} {_f(pct, '5.0%'):>5} "
              f"{r['mean_decode_batch']:>6.1f} {_f(r['batch_roofline_tok_s']):>8} "
              f"{r['dynamic_updates']:>7} {r.get('cell_s', 0):>6.1f}", flush=True)


def _cells(report: dict) -> dict[tuple[float, str], dict]:
    return {(r["ratio"], r["strategy"]): r for r in report["results"]}


def markdown(report: dict) -> str:
    """The README table (output tokens/s, GPU share) and the per-row detail table."""
    cells = _cells(report)
    strategies = [s for s in ALL_STRATEGIES if any(k[1] == s for k in cells)]
    ratios = sorted({k[0] for k in cells})
    m, mach, w = report["model"], report["machine"], report["workload"]
    lines = [
        f"Output tokens/s (GPU share of routed pairs): {m['preset']}, {m['num_layers']} layers"
        + (f", CPU experts in {m['cpu_weight_format']}" if m.get("cpu_weight_format") else "")
        + ", "
        f"{w['requests']} ShareGPT-like requests at once (x{w['scale']:g} lengths), "
        f"{mach['cpu']} ({mach['logical_cpus']} CPUs), GPU {mach['gpu'] or 'none'}; "
        f"DRAM {report['dram_read_gbps']:.0f} GB/s"
        + (f", HBM {report['hbm_gbps']:.0f} GB/s" if report["hbm_gbps"] else "") + ".",
        "",
        "| GPU experts | " + " | ".join(strategies) + " |",
        "| ---: | " + " | ".join("---:" for _ in strategies) + " |",
    ]
    for ratio in ratios:
        row = [f"{cells[(ratio, s)]['output_tok_s']:.1f} ({cells[(ratio, s)]['gpu_share']:.0%})"
               if (ratio, s) in cells else "-" for s in strategies]
        lines.append(f"| {ratio:.0%} | " + " | ".join(row) + " |")
    lines += ["", ("Per row: batch-1 decode beside its roofline at that placement (with the DRAM "
                   "bandwidth measured around it); the roofline at the workload's mean decode "
                   "batch; the share of the workload's time spent in steps carrying prompt tokens; dynamic updates."), "",
              ("| GPU experts | strategy | out tok/s | GPU share | b1 decode tok/s | b1 roofline "
               "| b1 % of roofline | b1 DRAM GB/s | mean batch | batch roofline | prefill time | updates |"),
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        if r.get("copied"):
            continue
        name = "(all)" if r["ratio"] in (0.0, 1.0) else r["strategy"]
        pct = r["b1_decode_tok_s"] / r["b1_roofline_tok_s"]
        prefill = f"{r['prefill_s'] / r['seconds']:.0%}" if r.get("prefill_s") is not None else "-"
        lines.append(f"| {r['ratio']:.0%} | {name} | {r['output_tok_s']:.1f} | {r['gpu_share']:.1%} "
                     f"| {r['b1_decode_tok_s']:.1f} | {r['b1_roofline_tok_s']:.1f} | {pct:.0%} "
                     f"| {_f(r.get('b1_dram_gbps'))} | {r['mean_decode_batch']:.1f} | {_f(r['batch_roofline_tok_s'])} "
                     f"| {prefill} | {r['dynamic_updates']} |")
    return "\n".join(lines) + "\n"


def _noise(*rows: dict) -> float:
    """Relative spread of the cells' runs, at least NOISE."""
    spread = [(max(r["runs"]) - min(r["runs"])) / r["output_tok_s"] for r in rows if r["output_tok_s"]]
    return max([NOISE, *spread])


def targets(report: dict) -> list[str]:
    """One met / not met line per target of the issue (never asserts)."""
    cells = _cells(report)
    ratios = sorted({k[0] for k in cells})
    out = []

    def verdict(name: str, failures: list[str], checked: int) -> None:
        if not checked:
            out.append(f"target {name}: not measured")
        elif failures:
            out.append(f"target {name}: NOT MET ({'; '.join(failures)})")
        else:
            out.append(f"target {name}: met")

    fails, n = [], 0
    for ratio in (0.0, 0.5):
        for s in STRATEGIES:
            r = cells.get((ratio, s))
            if r is None or r.get("copied"):
                continue
            n += 1
            pct = r["b1_decode_tok_s"] / r["b1_roofline_tok_s"]
            if pct < 0.8:
                fails.append(f"{ratio:.0%} {s} {pct:.0%}")
    verdict("batch-1 decode >= 80% of roofline at 0% and 50%", fails, n)

    base = cells.get((0.0, STRATEGIES[0]))
    at10 = [cells[(0.1, s)] for s in STRATEGIES if (0.1, s) in cells]
    fails, name = [], "best strategy at 10% >= 1.3x the 0% throughput"
    if base and at10:
        best = max(at10, key=lambda r: r["output_tok_s"])
        gain = best["output_tok_s"] / base["output_tok_s"]
        name += f" ({best['strategy']}: {gain:.2f}x)"
        if gain < 1.3:
            fails.append(f"{gain:.2f}x")
    verdict(name, fails, int(bool(base and at10)))

    fails, n = [], 0
    for ratio in (r for r in ratios if r >= 0.3 - 1e-9 and r < 1.0):
        order = [cells.get((ratio, s)) for s in ("frequency", "uniform", "random")]
        if None in order:
            continue
        n += 1
        for hi, lo in itertools.pairwise(order):
            if hi["output_tok_s"] < lo["output_tok_s"] * (1 - _noise(hi, lo)):
                fails.append(f"{ratio:.0%} {hi['strategy']} {hi['output_tok_s']:.1f} < "
                             f"{lo['strategy']} {lo['output_tok_s']:.1f}")
    verdict("frequency >= uniform >= random at every ratio from 30% (within noise)", fails, n)

    fails, n = [], 0
    for ratio in ratios:
        d, f = cells.get((ratio, "dynamic")), cells.get((ratio, "frequency"))
        if d is None or f is None or d.get("copied"):
            continue
        n += 1
        tol = _noise(d, f)
        if d["output_tok_s"] < f["output_tok_s"] * (1 - tol):
            same = " with no update: frequency's placement" if not d.get("dynamic_updates") else ""
            fails.append(f"{ratio:.0%} dynamic {d['output_tok_s']:.1f}{same} < frequency "
                         f"{f['output_tok_s']:.1f} (noise {tol:.0%})")
    verdict("dynamic never worse than frequency beyond noise", fails, n)
    return out


def plot(report: dict, path: Path) -> str:
    """Writes the PNG; returns what to add to the 'wrote' line (a note if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "; no PNG: matplotlib is not installed"
    cells = _cells(report)
    ratios = sorted({k[0] for k in cells})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, s in enumerate(s for s in ALL_STRATEGIES if any(k[1] == s for k in cells)):
        rs = [r for r in ratios if (r, s) in cells]
        color = f"C{i}"
        ax1.plot([100 * r for r in rs], [cells[(r, s)]["output_tok_s"] for r in rs], "o-", color=color, label=s)
        ax2.plot([100 * r for r in rs], [cells[(r, s)]["b1_decode_tok_s"] for r in rs], "o-", color=color,
                 label=s)
        ax2.plot([100 * r for r in rs], [cells[(r, s)]["b1_roofline_tok_s"] for r in rs], ":", color=color)
    m = report["model"]
    ax1.set(title=f"workload ({report['workload']['requests']} requests)", xlabel="GPU experts (%)",
            ylabel="output tokens/s")
    ax2.set(title="batch-1 decode (dotted: roofline)", xlabel="GPU experts (%)", ylabel="tokens/s")
    ax1.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.suptitle(f"{m['preset']}, {m['num_layers']} layers on {report['machine']['gpu'] or 'CPU only'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f", {path.name}"
