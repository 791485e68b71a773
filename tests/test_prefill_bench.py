"""bench/prefill_steps.py runs end to end on a small preset (a smoke run: benchmarks never
assert; this checks that it still works and reports every prefill step)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench" / "prefill_steps.py"


def test_prefill_steps_bench_smoke(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), "--preset", "medium", "--num-layers", "1",
                        "--requests", "4", "--runs", "2", "--chunk", "64",
                        "--weight-format", "int8", "--prefill-move",
                        "--checkpoint-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, "KTENGINE_NUM_CPU_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    runs = re.findall(r"run \d: (\d+) prompt tokens in (\d+) steps", r.stdout)
    assert len(runs) == 2 and all(int(tokens) > 0 and int(steps) >= 1 for tokens, steps in runs)
    step_lines = re.findall(r"^ +\d+ tokens, +\d+ sequences: .* MoE .*other", r.stdout, re.MULTILINE)
    assert len(step_lines) == sum(int(steps) for _, steps in runs)
    assert "median wall of runs 1..1" in r.stdout
    assert "CPU experts int8, prefill moves above" in r.stdout
    assert len(re.findall(r"; \d+ expert moves$", r.stdout, re.MULTILINE)) == 2
