"""Runs a test module's kernel cases in Triton's interpreter, in a subprocess: TRITON_INTERPRET
must be set before triton is imported, and this process has imported it already."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_interpreted(module: str, function: str = "_interpreter_cases", **env: str) -> None:
    """Calls tests/<module>.py's `function` under TRITON_INTERPRET=1 (and `env`); fails with
    the end of its stderr if it raises."""
    pytest.importorskip("triton")
    script = (f"import sys; sys.path.insert(0, sys.argv[1]); import {module} as m; "
              f"m.{function}()")
    run = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)],
                         env={**os.environ, "TRITON_INTERPRET": "1", **env},
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
