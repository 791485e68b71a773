"""The aiohttp application in-process: loading state, load failures, errors after a stream has
begun, the recorder endpoints."""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading

import pytest
from aiohttp.test_utils import TestClient, TestServer
from server_fixtures import free_port, server  # noqa: F401

from ktengine.engine import AsyncEngine
from ktengine.errors import KtengineError, ModelLoadError
from ktengine.server.app import ServerConfig, create_app, serve

USER = [{"role": "user", "content": "hello"}]


class _App:
    def __init__(self, factory, config: ServerConfig | None = None) -> None:
        self.app = create_app(factory, config)

    async def __aenter__(self) -> TestClient:
        self.client = TestClient(TestServer(self.app))
        await self.client.start_server()
        return self.client

    async def __aexit__(self, *exc) -> None:
        await self.client.close()


async def _ready(client: TestClient, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if (await client.get("/health")).status == 200:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the app never became ready")


async def test_health_is_503_while_loading(server):  # noqa: F811
    release = threading.Event()

    def slow_engine() -> AsyncEngine:
        assert release.wait(30)
        return AsyncEngine(server.engine_config(), progress=False)

    async with _App(slow_engine) as client:
        r = await client.get("/health")
        assert r.status == 503 and (await r.json())["status"] == "loading"
        r = await client.post("/v1/chat/completions", json={"messages": USER})
        assert r.status == 503 and (await r.json())["error"]["code"] == "model_loading"
        r = await client.get("/metrics")
        assert r.status == 200 and "ktengine_model_loaded 0" in await r.text()
        release.set()
        await _ready(client)
        r = await client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
        assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] >= 1


async def test_a_failed_engine_answers_503_with_an_openai_error(server):  # noqa: F811
    engine = AsyncEngine(server.engine_config(), progress=False)

    def boom(out):
        raise RuntimeError("bug in the step thread")

    engine._advance = boom  # the step thread's own code fails, not a model step
    async with _App(lambda: engine) as client:
        await _ready(client)
        r = await client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4})
        assert r.status == 500 and (await r.json())["error"]["code"] == "engine_error"
        r = await client.get("/health")
        body = await r.json()
        assert r.status == 503 and body["status"] == "failed" and "bug in the step thread" in body["error"]
        r = await client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4})
        assert r.status >= 500 and "the engine failed" in (await r.json())["error"]["message"]


async def test_prompts_are_tokenized_off_the_event_loop(server):  # noqa: F811
    """A long prompt takes seconds to tokenize: on the loop's thread it would stall every
    stream; the tokenizer releases the GIL (test_tokenizer.py), so a worker thread does not."""
    engine = AsyncEngine(server.engine_config(), progress=False)
    tok, threads = engine.tokenizer, []

    def spied(real):
        def spy(*args, **kwargs):
            threads.append(threading.get_ident())
            return real(*args, **kwargs)
        return spy

    tok.encode, tok.encode_chat = spied(tok.encode), spied(tok.encode_chat)
    async with _App(lambda: engine) as client:
        await _ready(client)
        loop_thread = threading.get_ident()
        r = await client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
        assert r.status == 200
        r = await client.post("/v1/completions", json={"prompt": ["a b", "c"], "max_tokens": 2})
        assert r.status == 200
    assert len(threads) >= 3 and loop_thread not in threads


async def test_load_failure_is_a_one_line_error():
    def broken() -> AsyncEngine:
        raise ModelLoadError("config.json not found in /nowhere")

    with pytest.raises(KtengineError, match="cannot load the model: config.json not found"):
        await asyncio.wait_for(serve(broken, ServerConfig(port=free_port()), signals=()), 30)


async def test_port_in_use_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(KtengineError, match=f"cannot listen on 127.0.0.1:{port}"):
            await serve(lambda: None, ServerConfig(port=port), signals=())


async def test_engine_failure_after_stream_began(server):  # noqa: F811
    engine = AsyncEngine(server.engine_config(), progress=False)
    real_step, calls = engine.runner.step, []

    def failing_step(batch, launched=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated device failure")
        return real_step(batch, launched)

    engine.runner.step = failing_step
    async with _App(lambda: engine) as client:
        await _ready(client)
        r = await client.post("/v1/chat/completions", json={
            "messages": USER, "max_tokens": 20, "ignore_eos": True, "stream": True})
        assert r.status == 200
        frames = (await r.text()).split("\n\n")[:-1]
        assert frames[-1] == "data: [DONE]"
        error = json.loads(frames[-2][6:])["error"]
        assert "simulated device failure" in error["message"] and error["code"] == "engine_error"
        assert sum('"content"' in f for f in frames) >= 2  # tokens came before the error

        calls.clear()
        r = await client.post("/v1/chat/completions", json={
            "messages": USER, "max_tokens": 20, "ignore_eos": True})
        assert r.status == 500 and (await r.json())["error"]["code"] == "engine_error"

        r = await client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
        assert r.status == 200  # the server goes on serving


async def test_a_choice_that_fails_to_start_leaves_none_running(server):  # noqa: F811
    """n > 1: when a later choice fails to start for a reason nobody foresaw, the choices
    already added are aborted (none keeps generating after the client got its error)."""
    engine = AsyncEngine(server.engine_config(), progress=False)
    real_generate, started = engine.generate, []

    def generate(ids, params=None, request_id=None):
        if started:
            raise RuntimeError("simulated failure to start")
        started.append(request_id)
        return real_generate(ids, params, request_id=request_id)

    engine.generate = generate
    async with _App(lambda: engine) as client:
        await _ready(client)
        r = await client.post("/v1/chat/completions", json={
            "messages": USER, "max_tokens": 400, "ignore_eos": True, "n": 2})
        assert r.status == 500 and (await r.json())["error"]["code"] == "internal_error"
        assert len(started) == 1
        for _ in range(3000):
            if engine.snapshot().num_running == 0 and engine.snapshot().num_waiting == 0:
                break
            await asyncio.sleep(0.01)
        # aborted at once: a few steps at most, not the 400 tokens it asked for
        assert engine.snapshot().generation_tokens_total < 50


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")

    async def dump(self) -> str:
        if "stop" not in self.calls:
            raise RuntimeError("nothing recorded yet")
        self.calls.append("dump")
        return "/tmp/expert_distribution.pt"


async def test_recorder_endpoints(server):  # noqa: F811
    engine = AsyncEngine(server.engine_config(), progress=False)
    engine.recorder = _Recorder()
    async with _App(lambda: engine, ServerConfig(api_key="k")) as client:
        await _ready(client)
        auth = {"Authorization": "Bearer k"}
        r = await client.post("/dump_expert_distribution_record", headers=auth)
        assert r.status == 400 and "nothing recorded yet" in (await r.json())["error"]["message"]
        assert (await client.get("/start_expert_distribution_record", headers=auth)).status == 200
        assert (await client.post("/stop_expert_distribution_record", headers=auth)).status == 200
        r = await client.get("/dump_expert_distribution_record", headers=auth)
        assert r.status == 200 and (await r.json())["path"] == "/tmp/expert_distribution.pt"
        assert engine.recorder.calls == ["start", "stop", "dump"]
        assert (await client.post("/start_expert_distribution_record")).status == 401


async def test_sigterm_ends_open_streams_and_exits_cleanly(tmp_path):
    import aiohttp
    from server_fixtures import start_server, stop_server

    running = start_server(tmp_path)
    try:
        headers = {"Authorization": f"Bearer {running.api_key}"}
        async with aiohttp.ClientSession(headers=headers) as s:
            r = await s.post(running.url + "/v1/chat/completions", json={
                "messages": USER, "max_tokens": 400, "ignore_eos": True, "stream": True})
            assert r.status == 200
            await r.content.readline()
            running.process.send_signal(signal.SIGTERM)
            rest = (await asyncio.wait_for(r.read(), 20)).decode()
        assert '"finish_reason":"abort"' in rest and rest.endswith("data: [DONE]\n\n")
        assert await asyncio.to_thread(running.process.wait, 20) == 0
    finally:
        stop_server(running.process)


async def test_a_second_signal_during_the_shutdown_exits_at_once(tmp_path):
    """A client still uploading its body holds the shutdown (for SHUTDOWN_GRACE_S); a second
    signal then ends the process with 128 + its number, and no traceback."""
    from server_fixtures import start_server, stop_server

    running = start_server(tmp_path)
    port = int(running.url.rsplit(":", 1)[1])
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + running.api_key.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"mess")
        await writer.drain()
        await asyncio.sleep(0.5)  # the handler is reading the body
        running.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        running.process.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(running.process.wait, 20) == 128 + signal.SIGINT
        writer.close()
        log = running.log_path.read_text(errors="replace")
        assert "exiting now" in log and "Traceback" not in log
    finally:
        stop_server(running.process)


async def test_requests_during_the_shutdown_are_told_so(server):  # noqa: F811
    from ktengine.server.app import _shutdown_engine

    engine = AsyncEngine(server.engine_config(), progress=False)
    async with _App(lambda: engine) as client:
        await _ready(client)
        await _shutdown_engine(client.server.app)
        r = await client.get("/health")
        assert r.status == 503 and (await r.json())["status"] == "shutting_down"
        r = await client.post("/v1/chat/completions", json={"messages": USER})
        assert r.status == 503 and (await r.json())["error"]["code"] == "server_shutting_down"


async def test_real_recorder_round_trip(server, tmp_path, monkeypatch):  # noqa: F811
    import torch

    from ktengine.config import RecorderConfig

    monkeypatch.setenv("KTENGINE_EXPERT_DISTRIBUTION_RECORDER_DIR", str(tmp_path))
    engine = AsyncEngine(server.engine_config(recorder=RecorderConfig(mode="stat")),
                         progress=False)
    async with _App(lambda: engine) as client:
        await _ready(client)
        assert (await client.post("/start_expert_distribution_record")).status == 200
        r = await client.post("/v1/completions", json={"prompt": [5, 6, 7, 8, 9], "max_tokens": 3,
                                                        "ignore_eos": True})
        assert r.status == 200
        assert (await client.post("/stop_expert_distribution_record")).status == 200
        r = await client.post("/dump_expert_distribution_record")
        assert r.status == 200
        path = (await r.json())["path"]
    assert path.startswith(str(tmp_path))
    counts = torch.load(path, weights_only=True)["logical_count"].sum(0)  # [layers, experts]
    top_k = engine.model_config.top_k
    # 5 prompt tokens + 2 decoded ones were routed, top-k experts each, in every MoE layer
    for layer, is_moe in enumerate(engine.model_config.moe_layers):
        assert int(counts[layer].sum()) == (7 * top_k if is_moe else 0)
