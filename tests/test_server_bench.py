"""bench/serving.py runs end to end against the test server (a smoke run; benchmarks never
assert, this test only checks that it still works and reports what it should)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from server_fixtures import server  # noqa: F401

BENCH = Path(__file__).parent.parent / "bench" / "serving.py"


def test_serving_bench_smoke(server, tmp_path):  # noqa: F811
    out_file = tmp_path / "serving.json"
    r = subprocess.run([sys.executable, str(BENCH), "--url", server.url, "--api-key",
                        server.api_key, "--num-requests", "6", "--concurrency", "3",
                        "--scale", "0.05", "--request-rate", "50", "--json",
                        "--output", str(out_file)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result == json.loads(out_file.read_text())
    res = result["results"]
    assert res["completed"] == 6 and res["failed"] == 0
    assert res["output_tokens"] > 6 and res["output_tokens_per_s"] > 0
    assert res["ttft_ms"]["p50"] > 0 and res["itl_ms"]["p99"] >= res["itl_ms"]["p50"]
    assert result["single_stream"]["decode_tokens_per_s"] > 0
    assert result["machine"]["logical_cpus"] >= 1
