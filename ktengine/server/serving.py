"""POST /v1/chat/completions and /v1/completions over the engine, streaming or not.

One request with P prompts and n choices becomes P × n engine requests (choice index
p × n + i). Whatever way the handler ends (finished, error, client gone and the handler
cancelled), every engine request it started is aborted in `finally`, which frees its KV memory.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ktengine.engine import AsyncEngine, EngineError, RequestStream
from ktengine.model.tokenizer import ChatTemplateError
from ktengine.request import RequestOutput, SamplingError, SamplingParams
from ktengine.server import protocol
from ktengine.server.errors import APIError, bad_request, error_body
from ktengine.server.metrics import Metrics
from ktengine.server.sse import EventStream

log = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # the legacy completions API's default


@dataclass
class Choice:
    """What one engine request has produced so far."""

    index: int
    prompt_index: int
    stream: RequestStream
    echo: str = ""  # completions with echo: the prompt text, sent before the first token
    started: bool = False  # a chunk of this choice has been sent
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict] = field(default_factory=list)  # chat: one entry per token
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.model_name = engine.model_name
        self._token_text: dict[int, str] = {}

    # -- handlers -------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        req = protocol.decode(await _body(request), protocol.ChatCompletionRequest)
        self._check_model(req.model)
        messages = protocol.chat_messages(req)
        extra = req.chat_template_kwargs or {}
        if {"messages", "add_generation_prompt", "tools"} & set(extra):
            raise bad_request("chat_template_kwargs may not set messages, add_generation_prompt "
                              "or tools", "chat_template_kwargs", "invalid_value")
        try:  # off the event loop: a long prompt takes seconds, and every stream would wait
            ids = await asyncio.to_thread(
                self.engine.tokenizer.encode_chat, messages,
                add_generation_prompt=req.add_generation_prompt, **extra)
        except (ChatTemplateError, TypeError, ValueError) as exc:
            raise bad_request(str(exc), "messages", "invalid_value") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        if max_tokens is None:  # OpenAI's default: whatever the context leaves
            max_tokens = max(1, self.engine.max_model_len - len(ids))
        params = protocol.sampling_params(req, max_tokens)
        choices = self._start([ids], params, req.n, "messages")
        return await self._respond(request, req, choices, [len(ids)], arrival, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        req = protocol.decode(await _body(request), protocol.CompletionRequest)
        self._check_model(req.model)
        prompts = protocol.completion_prompts(req)
        if req.echo and req.logprobs is not None:
            raise bad_request("echo with logprobs is not supported (no prompt logprobs)",
                              "echo", "unsupported")
        max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
        params = protocol.sampling_params(req, max_tokens)
        tok = self.engine.tokenizer
        ids = await asyncio.to_thread(
            lambda: [tok.encode(p) if isinstance(p, str) else p for p in prompts])
        choices = self._start(ids, params, req.n, "prompt")
        if req.echo:
            for c in choices:
                p = prompts[c.prompt_index]
                c.echo = p if isinstance(p, str) else tok.decode(p, req.skip_special_tokens)
        return await self._respond(request, req, choices, [len(i) for i in ids], arrival, chat=False)

    # -- starting and running requests ---------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} not found; this server serves "
                                f"{self.model_name!r}", "model", "model_not_found")

    def _start(self, prompts: list[list[int]], params: SamplingParams, n: int,
               prompt_param: str) -> list[Choice]:
        """Checks every prompt first, then adds P × n engine requests."""
        for ids in prompts:
            try:
                self.engine.check_request(ids, params)
            except SamplingError as exc:
                param = prompt_param if exc.param in ("messages", "prompt") else exc.param
                code = "context_length_exceeded" if "context" in str(exc) else "invalid_value"
                raise bad_request(str(exc), param, code) from None
        base = uuid.uuid4().hex
        choices: list[Choice] = []
        try:
            for p, ids in enumerate(prompts):
                for i in range(n):
                    seeded = params if params.seed is None or i == 0 else \
                        replace(params, seed=params.seed + i)
                    stream = self.engine.generate(ids, seeded, request_id=f"{base}-{p}-{i}")
                    choices.append(Choice(index=p * n + i, prompt_index=p, stream=stream))
        except BaseException as exc:  # whatever stops a later choice, none keeps running
            for c in choices:
                self.engine.abort(c.stream.request_id)
            if isinstance(exc, SamplingError):
                raise bad_request(str(exc), exc.param, "invalid_value") from None
            if isinstance(exc, EngineError):
                raise APIError(503, f"the server is overloaded: {exc}", None, "overloaded") from None
            raise
        return choices

    async def _outputs(self, choices: list[Choice], arrival: float
                       ) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Merges the choices' streams, in arrival order, and records latency metrics."""
        last_time = [arrival] * len(choices)
        pending: dict[asyncio.Future, int] = {}

        def want(k: int) -> None:
            pending[asyncio.ensure_future(choices[k].stream.__anext__())] = k

        for k in range(len(choices)):
            want(k)
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    k = pending.pop(fut)
                    try:
                        out = fut.result()
                    except StopAsyncIteration:
                        continue
                    now = time.monotonic()
                    num = len(out.delta_token_ids)
                    if num:
                        if choices[k].num_tokens == 0 and last_time[k] == arrival:
                            self.metrics.ttft.observe(now - arrival)
                        else:  # a reader that fell behind gets several tokens at once
                            self.metrics.itl.observe((now - last_time[k]) / num, num)
                        last_time[k] = now
                    if out.finished:
                        self.metrics.e2e.observe(now - arrival)
                    else:
                        want(k)
                    yield choices[k], out
        finally:
            for fut in pending:
                fut.cancel()

    async def _respond(self, request: web.Request, req: Any, choices: list[Choice],
                       prompt_lens: list[int], arrival: float, chat: bool) -> web.StreamResponse:
        rid = ("chatcmpl-" if chat else "cmpl-") + choices[0].stream.request_id.split("-")[0]
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": self.model_name}
        try:
            if req.stream:
                return await self._stream(request, req, choices, prompt_lens, arrival, chat, head)
            async with aclosing(self._outputs(choices, arrival)) as outputs:
                async for choice, out in outputs:
                    self._absorb(choice, out, chat)
        except EngineError as exc:
            raise APIError(500, str(exc), None, "engine_error") from None
        finally:  # normal end, error or cancellation (client gone): nothing keeps running
            for c in choices:
                await c.stream.aclose()
        usage = _usage(prompt_lens, choices)
        if chat:
            body = {**head, "object": "chat.completion", "choices": [{
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": c.logprobs} if req.logprobs else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
            } for c in choices], "usage": usage}
        else:
            body = {**head, "choices": [{
                "index": c.index, "text": c.echo + c.text,
                "logprobs": (self._completion_logprobs(c, len(c.echo))
                             if req.logprobs is not None else None),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
            } for c in choices], "usage": usage}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _stream(self, request: web.Request, req: Any, choices: list[Choice],
                      prompt_lens: list[int], arrival: float, chat: bool,
                      head: dict) -> web.StreamResponse:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        if include_usage:
            head["usage"] = None
        sse = EventStream(request)
        self.metrics.streams_open += 1
        try:
            await sse.start()
            if chat:  # the first chunk of each choice carries the role
                for c in choices:
                    await sse.send({**head, "choices": [{
                        "index": c.index, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}]})
            try:
                async with aclosing(self._outputs(choices, arrival)) as outputs:
                    async for c, out in outputs:
                        entry = self._chunk_choice(req, c, out, chat)
                        await sse.send({**head, "choices": [entry]})
            except EngineError as exc:  # the stream has begun: an error chunk, then [DONE]
                await sse.send(error_body(500, str(exc), None, "engine_error"))
            else:
                if include_usage:
                    await sse.send({**head, "choices": [], "usage": _usage(prompt_lens, choices)})
            await sse.done()
        except ConnectionError:  # the client went away; _respond aborts its requests
            log.info("client went away during %s", head["id"])
        finally:
            self.metrics.streams_open -= 1
        return sse.response

    def _chunk_choice(self, req: Any, c: Choice, out: RequestOutput, chat: bool) -> dict:
        """One choice's entry of a streamed chunk for the increment `out`."""
        offset = len(c.echo) + len(c.text)
        first, c.started = not c.started, True
        self._absorb(c, out, chat)
        num = len(out.delta_token_ids)
        if chat:
            logprobs = {"content": c.logprobs[-num:]} if req.logprobs and num else None
            entry = {"index": c.index, "delta": {"content": out.delta_text}, "logprobs": logprobs}
        else:
            logprobs = None
            if req.logprobs is not None:
                logprobs = self._completion_logprobs(c, offset, start=c.num_tokens - num)
            text = (c.echo if first else "") + out.delta_text
            entry = {"index": c.index, "text": text, "logprobs": logprobs}
        entry["finish_reason"] = c.finish_reason
        if c.finish_reason is not None:
            entry["stop_reason"] = c.stop_reason
        return entry

    # -- shaping the output ---------------------------------------------------------------------

    def _absorb(self, c: Choice, out: RequestOutput, chat: bool) -> None:
        c.text = out.text
        c.num_tokens = len(out.token_ids)
        if out.finished:
            c.finish_reason = out.finish_reason.value if out.finish_reason else "stop"
            c.stop_reason = out.stop_reason
        if out.delta_logprobs is None:
            return
        tops = out.delta_top_logprobs or [{}] * len(out.delta_token_ids)
        for token, lp, top in zip(out.delta_token_ids, out.delta_logprobs, tops):
            if chat:
                c.logprobs.append({**self._token_entry(token, lp), "top_logprobs": [
                    self._token_entry(t, v) for t, v in sorted(top.items(), key=lambda x: -x[1])]})
            else:
                c.tokens.append(token)
                c.token_logprobs.append(lp)
                c.top_logprobs.append(top)

    def _completion_logprobs(self, c: Choice, offset: int, start: int = 0) -> dict:
        tokens = [self._text_of(t) for t in c.tokens[start:]]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": c.token_logprobs[start:],
                "top_logprobs": [{self._text_of(t): v for t, v in top.items()}
                                 for top in c.top_logprobs[start:]],
                "text_offset": offsets}

    def _token_entry(self, token: int, logprob: float) -> dict:
        text = self._text_of(token)
        # the token's own bytes: a piece of a multi-byte character decodes to U+FFFD alone
        return {"token": text, "logprob": logprob,
                "bytes": list(self.engine.tokenizer.token_bytes(token))}

    def _text_of(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self.engine.tokenizer.decode([token], skip_special_tokens=False)
            self._token_text[token] = text
        return text


async def _body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except (web.RequestPayloadError, HttpProcessingError):  # the Content-Encoding lied
        raise bad_request("cannot read the request body: it does not decode as its "
                          f"Content-Encoding ({request.headers.get('Content-Encoding')}) says",
                          None, "invalid_encoding") from None


def _usage(prompt_lens: list[int], choices: list[Choice]) -> dict[str, int]:
    prompt = sum(prompt_lens)
    completion = sum(c.num_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
