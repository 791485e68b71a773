"""The `ktengine` command on the demo model: version, generate (text and JSON), bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ktengine.cli import main


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-cache")
    old = os.environ.get("KTENGINE_CACHE_DIR")
    os.environ["KTENGINE_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        del os.environ["KTENGINE_CACHE_DIR"]
    else:
        os.environ["KTENGINE_CACHE_DIR"] = old


def _json(capsys, *args) -> dict:
    assert main(["generate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_version_names_versions_and_instruction_sets(capsys):
    assert main(["version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ktengine ") and "\ntorch " in out and "CUDA" in out
    assert "CPU instruction sets:" in out


def test_generate_out_of_the_box_prints_text(demo_cache):
    env = {**os.environ, "KTENGINE_CACHE_DIR": str(demo_cache)}
    proc = subprocess.run([sys.executable, "-m", "ktengine", "generate", "--prompt", "Hello",
                           "--max-tokens", "16"], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()  # some text came out


def test_generate_json_has_ids_text_and_logprobs(demo_cache, capsys):
    out = _json(capsys, "--prompt", "Hello", "--max-tokens", "12", "--ignore-eos")
    assert len(out["token_ids"]) == 12 and len(out["logprobs"]) == 12
    assert all(lp <= 0 for lp in out["logprobs"]) and isinstance(out["text"], str)
    assert out["finish_reason"] == "length"
    again = _json(capsys, "--prompt-token-ids", ",".join(map(str, out["prompt_token_ids"])),
                  "--max-tokens", "12", "--ignore-eos")
    assert again["token_ids"] == out["token_ids"]  # greedy by default, same prompt ids


def test_seeded_sampling_repeats_and_formats_run(demo_cache, capsys):
    args = ["--prompt", "Once", "--max-tokens", "10", "--temperature", "1.0", "--top-p", "0.9",
            "--seed", "7", "--ignore-eos"]
    assert _json(capsys, *args)["token_ids"] == _json(capsys, *args)["token_ids"]
    for fmt in ("int8", "int4"):
        out = _json(capsys, "--prompt", "Hello", "--max-tokens", "4", "--kt-weight-format", fmt)
        assert 1 <= len(out["token_ids"]) <= 4


@pytest.mark.parametrize("args, message", [
    (["--prompt-token-ids", "1,x"], "comma-separated integers"),
    (["--prompt", "hi", "--temperature", "5"], "temperature"),
    (["--prompt", "hi", "--max-tokens", "0"], "max-tokens"),
    (["--prompt", "hi", "--kt-gpu-experts-ratio", "1.5"], "between 0 and 1"),
    (["--prompt", "hi", "--kt-enable-dynamic-expert-update"], "--kt-gpu-prefill-token-threshold"),
    (["--prompt", "hi", "--cuda-graph-max-bs", "0"], "--cuda-graph-max-bs"),
    (["--prompt", "hi", "--device", "meta"], "invalid device 'meta'"),
    (["--prompt", "hi", "--kt-cpuinfer", "-3"], "--kt-cpuinfer must be between 1"),
    (["--prompt", "hi", "--kt-expert-placement-strategy", "frequency",
      "--init-expert-location", "EMPTY_FILE"], "not a statistics file"),
])
def test_bad_input_is_one_line_and_exit_2(demo_cache, capsys, args, message, tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    args = [str(empty) if a == "EMPTY_FILE" else a for a in args]
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ktengine: error:") and message in err[0]


def test_serve_refuses_an_empty_api_key(capsys):
    assert main(["serve", "--api-key", "", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ktengine: error: --api-key must not be empty (leave it out to serve without a key)"]
