"""ktengine.client.AsyncClient against the running server, and its SSE parser and errors."""
from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from server_fixtures import free_port, server  # noqa: F401

from ktengine.client import (
    APIConnectionError,
    APIResponseError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    ServerError,
    iter_sse,
)

USER = [{"role": "user", "content": "Say something about experts."}]


@pytest.fixture
async def client(server):  # noqa: F811
    async with AsyncClient(server.url + "/v1", api_key=server.api_key) as c:
        yield c


async def test_chat_and_stream_agree(client, server):  # noqa: F811
    full = await client.chat(USER, model=server.model, max_tokens=10, temperature=0)
    assert full.id.startswith("chatcmpl-") and full.finish_reason in ("stop", "length")
    deltas = [d async for d in client.chat_stream(USER, max_tokens=10, temperature=0)]
    assert deltas[0].role == "assistant"
    assert "".join(d.text for d in deltas) == full.text
    assert [d.finish_reason for d in deltas if d.finish_reason] == [full.finish_reason]
    assert deltas[-1].usage == full.usage  # include_usage: the last delta carries it


async def test_completions(client):
    full = await client.completions("Experts are", max_tokens=6, temperature=0)
    text = "".join([d.text async for d in client.completions_stream("Experts are", max_tokens=6,
                                                                     temperature=0)])
    assert text == full.text and full.usage["completion_tokens"] <= 6
    many = await client.completions(["a", "b"], max_tokens=2, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]


async def test_models_health_metrics(client, server):  # noqa: F811
    assert [m["id"] for m in await client.models()] == [server.model]
    assert await client.health() is True
    assert "ktengine_num_requests_running" in await client.metrics()


async def test_typed_errors(client, server):  # noqa: F811
    with pytest.raises(BadRequestError) as e:
        await client.chat(USER, temperature=9)
    assert e.value.param == "temperature" and e.value.status == 400 and "between" in str(e.value)
    with pytest.raises(BadRequestError) as e:  # raised before the stream yields anything
        [d async for d in client.chat_stream(USER, top_p=-1)]
    assert e.value.param == "top_p"
    with pytest.raises(NotFoundError):
        await client.chat(USER, model="nope")
    with pytest.raises(BadRequestError, match="expert-distribution-recorder-mode"):
        await client.start_expert_distribution_record()
    async with AsyncClient(server.url, api_key="wrong") as bad:
        with pytest.raises(AuthenticationError):
            await bad.models()
        assert await bad.health() is True  # /health needs no key


async def test_no_server_is_a_connection_error():
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", connect_timeout=2) as c:
        with pytest.raises(APIConnectionError, match="no server answers"):
            await c.health()
        with pytest.raises(APIConnectionError):
            [d async for d in c.chat_stream(USER)]


async def _chunks(*parts: bytes):
    for p in parts:
        yield p


async def test_iter_sse_handles_long_lines_and_splits():
    long_value = "x" * (3 * 2**20)  # longer than aiohttp's readline limit
    raw = (b": comment\r\n" + b"data: " + long_value.encode() + b"\r\n\r\n"
           + b"event: message\ndata: line one\ndata: line two\n\n" + "data: é\n\n".encode()
           + b"data: [DONE]\n\n")
    parts = [raw[i:i + 4093] for i in range(0, len(raw), 4093)]  # splits inside lines and é
    events = [e async for e in iter_sse(_chunks(*parts))]
    assert events == [long_value, "line one\nline two", "é", "[DONE]"]


async def _fake_server(handler) -> TestServer:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    srv = TestServer(app)
    await srv.start_server()
    return srv


async def test_error_chunk_in_stream_raises_and_long_frames_pass():
    big = "y" * 300_000

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"' + big.encode()
                         + b'"},"finish_reason":null}]}\n\n')
        await resp.write(b'data: {"error":{"message":"engine died","type":"server_error",'
                         b'"param":null,"code":"engine_error"}}\n\ndata: [DONE]\n\n')
        return resp

    srv = await _fake_server(handler)
    try:
        async with AsyncClient(str(srv.make_url(""))) as c:
            got = []
            with pytest.raises(ServerError, match="engine died") as e:
                async for d in c.chat_stream(USER):
                    got.append(d.text)
            assert got == [big] and e.value.code == "engine_error"
    finally:
        await srv.close()


async def test_read_timeout():
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(2)
        return resp

    srv = await _fake_server(handler)
    try:
        async with AsyncClient(str(srv.make_url("")), read_timeout=0.3) as c:
            with pytest.raises(APITimeoutError):
                [d async for d in c.chat_stream(USER)]
    finally:
        await srv.close()


async def test_requests_beyond_max_connections_wait_for_one_instead_of_timing_out():
    async def models(request: web.Request) -> web.Response:
        await asyncio.sleep(0.6)  # longer than the connect timeout below
        return web.json_response({"object": "list", "data": [{"id": "m"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    srv = TestServer(app)
    await srv.start_server()
    try:
        async with AsyncClient(str(srv.make_url("")), max_connections=1, connect_timeout=0.2) as c:
            got = await asyncio.gather(*(c.models() for _ in range(3)))
        assert got == [[{"id": "m"}]] * 3
    finally:
        await srv.close()


async def test_bad_urls_and_servers_that_are_not_openai():
    for url in ("localhost:8000", "notaurl", "http://127.0.0.1:99999", "ftp://x:1", ""):
        with pytest.raises(APIConnectionError, match="invalid server URL"):
            AsyncClient(url)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list"})

    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404, text="<html>\n<body>\n<h1>Not here</h1>\n" + "x\n" * 20,
                            content_type="text/html")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", missing)
    srv = TestServer(app)
    await srv.start_server()
    try:
        async with AsyncClient(str(srv.make_url(""))) as c:
            with pytest.raises(APIResponseError, match="model list"):
                await c.models()
            with pytest.raises(NotFoundError) as e:
                await c.chat(USER)
            assert str(e.value) == "404 HTTP 404: <html>"
    finally:
        await srv.close()


@pytest.mark.parametrize("cut,match", [
    ("reset", "failed"),  # the server dies mid-answer
    ("eof", "ended before its"),  # a proper end of the body, but no finish and no [DONE]
])
async def test_a_stream_cut_mid_answer_is_a_connection_error(cut, match):
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"half"},'
                         b'"finish_reason":null}]}\n\n')
        if cut == "eof":
            await resp.write_eof()
        else:
            await asyncio.sleep(0.05)
            request.transport.close()
        return resp

    srv = await _fake_server(handler)
    try:
        async with AsyncClient(str(srv.make_url(""))) as c:
            got = []
            with pytest.raises(APIConnectionError, match=match):
                async for d in c.chat_stream(USER):
                    got.append(d.text)
            assert got == ["half"]
    finally:
        await srv.close()


def test_examples_run(server):  # noqa: F811
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    for example in ("chat_stream_client.py", "chat_stream_openai.py"):
        r = subprocess.run([sys.executable, str(root / "examples" / example), "hello", "--url",
                            server.url, "--api-key", server.api_key, "--max-tokens", "5"],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        assert "5 completion tokens]" in r.stdout.splitlines()[-1]
