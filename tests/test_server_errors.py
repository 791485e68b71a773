"""Raw HTTP against the running server: every bad input gets a 4xx in the OpenAI error shape,
SSE framing and headers, client disconnects abort their requests, many streams at once."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from server_fixtures import server  # noqa: F401  (the session's `ktengine serve` process)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hello"}]


def _auth(server) -> dict[str, str]:  # noqa: F811
    return {"Authorization": f"Bearer {server.api_key}"}


async def _post(server, path: str, body: bytes | dict | None, headers=None):  # noqa: F811
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    async with aiohttp.ClientSession() as s, s.post(
        server.url + path, data=data, headers={**_auth(server), **(headers or {})},
    ) as resp:
        return resp.status, await resp.read(), resp.headers


def _error(status: int, raw: bytes) -> dict:
    body = json.loads(raw)
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and len(err["message"]) > 10
    return err


def metrics_of(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def _metrics(server) -> dict[str, float]:  # noqa: F811
    async with aiohttp.ClientSession() as s, s.get(server.url + "/metrics",
                                                   headers=_auth(server)) as r:
        assert r.status == 200
        return metrics_of(await r.text())


async def _wait_idle(server, timeout: float = 10.0) -> dict[str, float]:  # noqa: F811
    deadline = time.monotonic() + timeout
    while True:
        m = await _metrics(server)
        if m["ktengine_num_requests_running"] == 0 and m["ktengine_num_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, f"requests still running: {m}"
        await asyncio.sleep(0.05)


LONG = "word " * 600  # more tokens than the test server's context (512)

BAD = [  # (path, body, status, param)
    (CHAT, b'{"messages": [', 400, None),
    (CHAT, b"", 400, None),
    (CHAT, b"[]", 400, None),
    (CHAT, b"\xff\xfe", 400, None),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": "hello"}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content[0]"),
    (CHAT, {"messages": USER, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": USER, "temperature": -0.1}, 400, "temperature"),
    (CHAT, {"messages": USER, "temperature": 2.5}, 400, "temperature"),
    (CHAT, {"messages": USER, "top_p": -0.1}, 400, "top_p"),
    (CHAT, {"messages": USER, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"messages": USER, "top_k": -3}, 400, "top_k"),
    (CHAT, {"messages": USER, "min_p": 2}, 400, "min_p"),
    (CHAT, {"messages": USER, "presence_penalty": 3}, 400, "presence_penalty"),
    (CHAT, {"messages": USER, "frequency_penalty": -3}, 400, "frequency_penalty"),
    (CHAT, {"messages": USER, "repetition_penalty": 0}, 400, "repetition_penalty"),
    (CHAT, {"messages": USER, "n": 0}, 400, "n"),
    (CHAT, {"messages": USER, "n": 1000}, 400, "n"),
    (CHAT, {"messages": USER, "n": True}, 400, "n"),
    (CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "max_tokens": 1.5}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "max_completion_tokens": -1}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": USER, "stop": 7}, 400, "stop"),
    (CHAT, {"messages": USER, "stop": [""]}, 400, "stop"),
    (CHAT, {"messages": USER, "seed": "x"}, 400, "seed"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "stream_options": {"include_usage": "y"}}, 400,
     "stream_options.include_usage"),
    (CHAT, {"messages": USER, "logit_bias": {"x": 1.0}}, 400, "logit_bias"),
    (CHAT, {"messages": USER, "logit_bias": {"5": 101}}, 400, "logit_bias"),
    (CHAT, {"messages": USER, "logit_bias": {"-1": 1}}, 400, "logit_bias"),
    (CHAT, {"messages": USER, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    (CHAT, {"messages": USER, "logit_bias": {"5": "a"}}, 400, "logit_bias"),
    (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools"),
    (CHAT, {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    (CHAT, {"messages": USER, "max_tokens": 600}, 400, "max_tokens"),
    (COMPLETIONS, {}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [1, "a"]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [[1, 2], []]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [True, 2]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": 5}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [10**9]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [-1]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": LONG}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 1, "echo": True}, 400, "echo"),
    (COMPLETIONS, {"prompt": "hi", "suffix": "x"}, 400, "suffix"),
    (COMPLETIONS, {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe hi"}]}', 400, None),
    (COMPLETIONS, b'{"prompt": "\xc3\x28"}', 400, None),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 100000
     + b"]" * 100000 + b"}", 400, None),
    (CHAT, {"messages": USER, "seed": 2**64}, 400, "seed"),
    (CHAT, {"messages": USER, "seed": -2**63 - 1}, 400, "seed"),
    (CHAT, {"messages": USER, "seed": 2**63 - 1, "n": 2}, 400, "seed"),
    (CHAT, {"messages": USER, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
     "messages[0].content[0].text"),
    (CHAT, {"messages": USER, "stop_token_ids": [-5]}, 400, "stop_token_ids"),
    (CHAT, {"messages": USER, "stop_token_ids": [10**12]}, 400, "stop_token_ids"),
    (CHAT, {"messages": USER, "model": "gpt-17"}, 404, "model"),
    (COMPLETIONS, {"prompt": "hi", "model": "gpt-17"}, 404, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD,
                         ids=[f"{i}-{b if isinstance(b, bytes) else list(b)}"[:40]
                              for i, (_, b, _, _) in enumerate(BAD)])
async def test_bad_input_is_a_clear_4xx(server, path, body, status, param):  # noqa: F811
    got, raw, _ = await _post(server, path, body)
    assert got == status, raw
    err = _error(got, raw)
    assert err["param"] == param, err
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


async def test_body_that_does_not_match_its_encoding_is_a_400(server):  # noqa: F811
    body = json.dumps({"messages": USER, "max_tokens": 1}).encode()
    got, raw, _ = await _post(server, CHAT, body, {"Content-Encoding": "gzip",
                                                  "Content-Type": "application/json"})
    assert got == 400, raw
    assert _error(got, raw)["code"] == "invalid_encoding"


async def test_extreme_sampling_values_stay_finite(server):  # noqa: F811
    """A temperature below 1e-5 samples greedily (logits / T would overflow); a tiny
    repetition penalty still gives a valid draw."""
    greedy = {"messages": USER, "max_tokens": 4, "temperature": 0, "logprobs": True}
    got, raw, _ = await _post(server, CHAT, greedy)
    assert got == 200, raw
    want = json.loads(raw)["choices"][0]
    for t in (1e-39, 1e-7):
        got, raw, _ = await _post(server, CHAT, {**greedy, "temperature": t})
        assert got == 200, raw
        assert json.loads(raw)["choices"][0]["message"] == want["message"], t
    got, raw, _ = await _post(server, CHAT, {"messages": USER, "max_tokens": 4, "seed": 3,
                                             "repetition_penalty": 1e-39, "logprobs": True})
    assert got == 200, raw
    assert all(e["logprob"] == e["logprob"] for e in  # no NaN
               json.loads(raw)["choices"][0]["logprobs"]["content"])


async def test_logprob_bytes_are_the_tokens_own(server):  # noqa: F811
    """A token holding part of a UTF-8 character shows as U+FFFD, and its `bytes` are its own
    (clients join them to rebuild the character), not U+FFFD's."""
    from ktengine.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(server.model_dir)
    partial = next(i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd")
    got, raw, _ = await _post(server, CHAT, {"messages": USER, "max_tokens": 2, "logprobs": True,
                                             "top_logprobs": 1, "logit_bias": {str(partial): 100}})
    assert got == 200, raw
    entries = json.loads(raw)["choices"][0]["logprobs"]["content"]
    assert entries[0]["token"] == "\ufffd"
    assert entries[0]["bytes"] == list(tok.token_bytes(partial)) != list("\ufffd".encode())


async def test_context_errors_say_so(server):  # noqa: F811
    _, raw, _ = await _post(server, CHAT, {"messages": [{"role": "user", "content": LONG}]})
    err = _error(400, raw)
    assert err["code"] == "context_length_exceeded" and "512" in err["message"]
    _, raw, _ = await _post(server, CHAT, {"messages": USER, "max_tokens": 600})
    assert "exceeds the context" in _error(400, raw)["message"]


async def test_auth(server):  # noqa: F811
    async with aiohttp.ClientSession() as s:
        async with s.get(server.url + "/health") as r:  # open without a key
            assert r.status == 200 and (await r.json())["status"] == "ok"
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": server.api_key}):
            async with s.post(server.url + CHAT, json={"messages": USER}, headers=headers) as r:
                assert r.status == 401
                assert _error(401, await r.read())["code"] == "invalid_api_key"
        async with s.get(server.url + "/v1/models", headers=_auth(server)) as r:
            assert r.status == 200


async def test_routing_errors(server):  # noqa: F811
    async with aiohttp.ClientSession(headers=_auth(server)) as s:
        async with s.get(server.url + "/v2/nothing") as r:
            assert r.status == 404 and _error(404, await r.read())["type"] == "not_found_error"
        async with s.delete(server.url + CHAT) as r:
            assert r.status == 405 and "POST" in r.headers["Allow"]
            _error(405, await r.read())


async def test_oversized_body_is_413(server):  # noqa: F811
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (9 * 2**20)}]}).encode()
    status, raw, _ = await _post(server, CHAT, big)
    assert status == 413 and _error(413, raw)["code"] == "request_too_large"


async def test_recorder_off(server):  # noqa: F811
    async with aiohttp.ClientSession(headers=_auth(server)) as s:
        for action in ("start", "stop", "dump"):
            async with s.post(f"{server.url}/{action}_expert_distribution_record") as r:
                assert r.status == 400
                assert "--expert-distribution-recorder-mode" in _error(400, await r.read())["message"]


async def test_sse_framing(server):  # noqa: F811
    body = {"messages": USER, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    status, raw, headers = await _post(server, CHAT, body)
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["Cache-Control"] == "no-cache" and headers["X-Accel-Buffering"] == "no"
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n")
    frames = text.split("\n\n")[:-1]
    assert all(f.startswith("data: ") and "\n" not in f for f in frames)
    chunks = [json.loads(f[6:]) for f in frames[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum(1 for c in chunks for ch in c["choices"] if ch["finish_reason"]) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1


async def test_disconnect_mid_stream_aborts_and_others_continue(server):  # noqa: F811
    before = await _wait_idle(server)
    long = {"messages": USER, "max_tokens": 400, "ignore_eos": True, "stream": True}
    short = {"messages": USER, "max_tokens": 40, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession(headers=_auth(server)) as other_session:
        other = asyncio.ensure_future(_read_stream(other_session, server.url + CHAT, short))
        async with aiohttp.ClientSession(headers=_auth(server)) as s:
            resp = await s.post(server.url + CHAT, json=long)
            assert resp.status == 200
            got = 0
            async for line in resp.content:
                got += line.startswith(b"data: ")
                if got >= 3:
                    break
            resp.close()  # drop the connection in mid-stream
        m = await _wait_idle(server)
        assert m['ktengine_requests_total{finish_reason="abort"}'] == \
            before['ktengine_requests_total{finish_reason="abort"}'] + 1
        # the request stopped long before its 400 tokens
        assert m["ktengine_generation_tokens_total"] - before["ktengine_generation_tokens_total"] < 300
        text = await other
        assert text.endswith("data: [DONE]\n\n") and '"finish_reason":"length"' in text


async def test_disconnect_while_waiting_non_streamed(server):  # noqa: F811
    before = await _wait_idle(server)
    timeout = aiohttp.ClientTimeout(total=0.3)
    async with aiohttp.ClientSession(headers=_auth(server), timeout=timeout) as s:
        with pytest.raises(asyncio.TimeoutError):
            async with s.post(server.url + CHAT, json={"messages": USER, "max_tokens": 400,
                                                       "ignore_eos": True}) as r:
                await r.read()
    m = await _wait_idle(server)
    assert m['ktengine_requests_total{finish_reason="abort"}'] == \
        before['ktengine_requests_total{finish_reason="abort"}'] + 1


async def _read_stream(session: aiohttp.ClientSession, url: str, body: dict) -> str:
    async with session.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        return (await r.read()).decode()


async def test_many_concurrent_streams(server):  # noqa: F811
    n = 200
    body = {"messages": USER, "max_tokens": 3, "ignore_eos": True, "stream": True}
    connector = aiohttp.TCPConnector(limit=n)
    async with aiohttp.ClientSession(headers=_auth(server), connector=connector) as s:
        texts = await asyncio.gather(*[_read_stream(s, server.url + CHAT, body) for _ in range(n)])
    for text in texts:
        assert text.endswith("data: [DONE]\n\n")
        assert text.count('"finish_reason":"length"') == 1
    m = await _wait_idle(server)
    assert m["ktengine_sse_streams_open"] == 0


async def test_metrics_exposition(server):  # noqa: F811
    await _post(server, CHAT, {"messages": USER, "max_tokens": 3})
    await _post(server, CHAT, {"messages": USER, "max_tokens": 0})
    async with aiohttp.ClientSession(headers=_auth(server)) as s, \
            s.get(server.url + "/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    m = metrics_of(text)
    for name in ("ktengine_time_to_first_token_seconds", "ktengine_inter_token_latency_seconds",
                 "ktengine_e2e_request_latency_seconds"):
        assert f"# TYPE {name} histogram" in text
        assert m[f'{name}_bucket{{le="+Inf"}}'] == m[f"{name}_count"] > 0
        buckets = [v for k, v in m.items() if k.startswith(name + "_bucket")]
        assert buckets == sorted(buckets)  # cumulative
    assert m["ktengine_generation_tokens_total"] > 0 and m["ktengine_prompt_tokens_total"] > 0
    assert m["ktengine_engine_prefill_seconds_total"] > 0
    assert 0.0 <= m["ktengine_gpu_expert_share"] <= 1.0
    assert m["ktengine_model_loaded"] == 1
    assert m['ktengine_http_errors_total{status="400"}'] >= 1
