"""A real `ktengine serve` subprocess, started once per test session and shared by the server,
client and chat tests.

Every test module that imports the `server` fixture gets the same process: the fixture keeps
it in the session's config stash and stops it when the session ends.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

API_KEY = "test-key"
MODEL_NAME = "ktengine-test"
MAX_MODEL_LEN = 512
STARTUP_TIMEOUT_S = 180.0


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    api_key: str
    model: str
    max_model_len: int
    process: subprocess.Popen
    log_path: Path
    model_dir: Path  # the checkpoint it serves, for engines built inside a test

    def engine_config(self, **kw):
        from ktengine.config import EngineConfig, PlacementConfig

        return EngineConfig(model=str(self.model_dir), served_model_name=self.model,
                            placement=PlacementConfig(gpu_experts_ratio=0.25), **kw)

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["KTENGINE_CACHE_DIR"] = str(cache_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _demo_model_available() -> bool:
    try:
        import ktengine.model.demo  # noqa: F401
    except ImportError:
        return False
    return True


def model_dir(tmp: Path, cache_dir: Path) -> Path:
    """The demo model when it exists; else a tiny random checkpoint with a ChatML tokenizer."""
    if _demo_model_available():
        from ktengine.model.demo import ensure_demo_model

        return ensure_demo_model(cache_dir)
    from checkpoints import make_checkpoint

    return make_checkpoint(tmp / "tiny-qwen3-moe", "Qwen3MoeForCausalLM")


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}:\n"
                               + log_path.read_text(errors="replace")[-4000:])
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server was not healthy after {timeout:.0f} s:\n"
                       + log_path.read_text(errors="replace")[-4000:])


def start_server(tmp: Path, extra: list[str] = ()) -> RunningServer:
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    model = model_dir(tmp, tmp / "cache")
    args = [sys.executable, "-m", "ktengine", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--api-key", API_KEY, "--served-model-name", MODEL_NAME,
            "--max-model-len", str(MAX_MODEL_LEN), "--max-running-requests", "32",
            # both sides of the hybrid MoE at work: a quarter of the experts in the torch
            # ("GPU") path, the rest on the CPU kernels
            "--kt-gpu-experts-ratio", "0.25",
            "--model", str(model), *extra]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                   env=subprocess_env(tmp / "cache"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log_path, STARTUP_TIMEOUT_S)
    except BaseException:
        stop_server(process)
        raise
    return RunningServer(url, API_KEY, MODEL_NAME, MAX_MODEL_LEN, process, log_path, model)


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_SERVER_KEY = pytest.StashKey[RunningServer]()


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    config = request.config
    if _SERVER_KEY not in config.stash:
        running = start_server(tmp_path_factory.mktemp("server"))
        config.stash[_SERVER_KEY] = running
        config.add_cleanup(lambda: stop_server(running.process))
    return config.stash[_SERVER_KEY]
