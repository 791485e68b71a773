"""AsyncClient: an asyncio client for a ktengine (or any OpenAI-compatible) server.

>>> async with AsyncClient("http://127.0.0.1:30000") as client:
...     reply = await client.chat([{"role": "user", "content": "Hi"}], max_tokens=32)
...     print(reply.text)
...     async for delta in client.chat_stream([{"role": "user", "content": "Hi"}]):
...         print(delta.text, end="", flush=True)

Errors raise APIError subclasses carrying the server's message, type, param and code;
no server at the address, a malformed URL, or a connection lost mid-answer raise
APIConnectionError; an answer not in the API's shape raises APIResponseError. SSE is parsed here, line by line over
the raw byte stream, so a frame of any length is fine.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import yarl

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "APIConnectionError", "APIError", "APIResponseError", "APIStatusError", "APITimeoutError",
    "AsyncClient",
    "AuthenticationError", "BadRequestError", "Completion", "CompletionChoice", "NotFoundError",
    "RequestTooLargeError", "ServerError", "ServiceUnavailableError", "StreamDelta",
]


class APIError(Exception):
    """Base of every error the client raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIConnectionError(APIError):
    """No server answered at the address (refused, unreachable, reset)."""


class APITimeoutError(APIConnectionError):
    """The server did not answer within the configured timeout."""


class APIResponseError(APIError):
    """The server answered something that is not the OpenAI API's shape."""


class APIStatusError(APIError):
    """The server answered with an error; its message, type, param and code are kept."""

    def __init__(self, status: int, message: str, type: str | None = None,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code

    def __str__(self) -> str:
        where = f" (param {self.param})" if self.param else ""
        return f"{self.status} {self.message}{where}"


class BadRequestError(APIStatusError):
    """400: the request was invalid; `param` names the field."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key."""


class NotFoundError(APIStatusError):
    """404: no such model or endpoint."""


class RequestTooLargeError(APIStatusError):
    """413: the request body is too large."""


class ServiceUnavailableError(APIStatusError):
    """503: the model is still loading, or the server is overloaded."""


class ServerError(APIStatusError):
    """5xx: the server failed (also an error sent inside a stream)."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError, 401: AuthenticationError, 404: NotFoundError,
    413: RequestTooLargeError, 503: ServiceUnavailableError,
}


def _status_error(status: int, body: Any) -> APIStatusError:
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):  # not an OpenAI-style server: its body's first line
        first = next((line.strip() for line in str(body).splitlines() if line.strip()), "")
        err = {"message": f"HTTP {status}" + (f": {first[:200]}" if first else "")}
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIStatusError)
    return cls(status, str(err.get("message")), err.get("type"), err.get("param"), err.get("code"))


@dataclass
class CompletionChoice:
    index: int
    text: str
    finish_reason: str | None
    logprobs: Any = None


@dataclass
class Completion:
    """A non-streamed answer; `text` is the first choice's."""

    id: str
    model: str
    choices: list[CompletionChoice]
    usage: dict[str, int]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason


@dataclass
class StreamDelta:
    """One choice's increment of a streamed answer; the usage chunk has `usage` and no text."""

    index: int
    text: str
    finish_reason: str | None = None
    role: str | None = None
    logprobs: Any = None
    usage: dict[str, int] | None = None


class AsyncClient:
    """Client of the OpenAI-compatible API. `base_url` may end in /v1 or not.

    timeout: seconds for a whole non-streamed request; read_timeout: the longest silence
    allowed inside a stream; connect_timeout: to open the connection; max_connections: requests
    in flight at once (more wait for a free connection).
    """

    def __init__(self, base_url: str = "http://127.0.0.1:30000", api_key: str | None = None, *,
                 timeout: float | None = 600.0, read_timeout: float | None = 300.0,
                 connect_timeout: float = 10.0, max_connections: int = 100) -> None:
        base = base_url.rstrip("/")
        self.base_url = base.removesuffix("/v1")
        _check_url(self.base_url)
        self.api_key = api_key
        # sock_connect, not connect: aiohttp's `connect` also bounds the wait for a free pooled
        # connection, so requests queued beyond max_connections would time out
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                                     sock_read=read_timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the API ----------------------------------------------------------------------------

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> Completion:
        """POST /v1/chat/completions; params are the OpenAI fields (max_tokens, temperature...)."""
        body = await self._json("POST", "/v1/chat/completions",
                                {"messages": messages, **params, "stream": False})
        return _completion(body, chat=True)

    async def chat_stream(self, messages: list[dict[str, Any]], *, include_usage: bool = True,
                          **params: Any) -> AsyncIterator[StreamDelta]:
        """Streams the answer as StreamDeltas; the last one carries the usage (include_usage)."""
        payload = {"messages": messages, **params, "stream": True,
                   "stream_options": {"include_usage": include_usage}}
        async for chunk in self._events("/v1/chat/completions", payload):
            for delta in _deltas(chunk, chat=True):
                yield delta

    async def completions(self, prompt: str | list, **params: Any) -> Completion:
        body = await self._json("POST", "/v1/completions",
                                {"prompt": prompt, **params, "stream": False})
        return _completion(body, chat=False)

    async def completions_stream(self, prompt: str | list, *, include_usage: bool = True,
                                 **params: Any) -> AsyncIterator[StreamDelta]:
        payload = {"prompt": prompt, **params, "stream": True,
                   "stream_options": {"include_usage": include_usage}}
        async for chunk in self._events("/v1/completions", payload):
            for delta in _deltas(chunk, chat=False):
                yield delta

    async def models(self) -> list[dict[str, Any]]:
        body = await self._json("GET", "/v1/models")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or not all(isinstance(m, dict) and "id" in m for m in data):
            raise APIResponseError(f"{self.base_url}/v1/models did not answer a model list "
                                   "(is it an OpenAI-compatible server?)")
        return data

    async def health(self) -> bool:
        """True when the server is ready, False while it loads; raises if none answers."""
        try:
            await self._json("GET", "/health")
        except ServiceUnavailableError:
            return False
        return True

    async def metrics(self) -> str:
        return await self._request("GET", "/metrics", None, text=True)

    async def start_expert_distribution_record(self) -> dict[str, Any]:
        return await self._json("POST", "/start_expert_distribution_record")

    async def stop_expert_distribution_record(self) -> dict[str, Any]:
        return await self._json("POST", "/stop_expert_distribution_record")

    async def dump_expert_distribution_record(self) -> str:
        """Asks the server to write the recorded statistics; returns the file's path there."""
        return (await self._json("POST", "/dump_expert_distribution_record"))["path"]

    # -- transport ----------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def _json(self, method: str, path: str, payload: Any = None) -> Any:
        return await self._request(method, path, payload)

    async def _request(self, method: str, path: str, payload: Any, text: bool = False) -> Any:
        data = orjson.dumps(payload) if payload is not None else None
        try:
            async with self._get_session().request(
                method, self.base_url + path, data=data, headers=self._headers(),
                timeout=self._timeout,
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise _status_error(resp.status, _loads(raw))
                return raw.decode("utf-8", "replace") if text else _loads(raw)
        except (asyncio.TimeoutError, TimeoutError):
            raise APITimeoutError(f"{method} {self.base_url}{path} timed out") from None
        except aiohttp.ClientConnectionError as exc:
            raise APIConnectionError(f"no server answers at {self.base_url}: {exc}") from None
        except aiohttp.ClientError as exc:  # e.g. the server closed a half-sent answer
            raise APIConnectionError(f"{method} {self.base_url}{path} failed: {exc}") from None

    async def _events(self, path: str, payload: Any) -> AsyncIterator[dict[str, Any]]:
        """POSTs and yields each SSE data payload as a dict until [DONE]."""
        try:
            async with self._get_session().post(
                self.base_url + path, data=orjson.dumps(payload), headers=self._headers(),
                timeout=self._stream_timeout,
            ) as resp:
                if resp.status >= 400:
                    raise _status_error(resp.status, _loads(await resp.read()))
                async for data in iter_sse(resp.content):
                    if data == "[DONE]":
                        return
                    chunk = _loads(data.encode())
                    if isinstance(chunk, dict) and "error" in chunk:
                        raise _status_error(500, chunk)
                    yield chunk
            # the server closed the stream cleanly but never finished it: the answer is cut
            raise APIConnectionError(f"POST {self.base_url}{path}: the stream ended before "
                                     "its [DONE]")
        except (asyncio.TimeoutError, TimeoutError):
            raise APITimeoutError(f"POST {self.base_url}{path}: no data for too long") from None
        except aiohttp.ClientError as exc:  # refused, reset, or a stream cut off mid-answer
            raise APIConnectionError(f"connection to {self.base_url} failed: {exc}") from None


async def iter_sse(content: aiohttp.StreamReader | AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The `data` of each server-sent event (multi-line data joined with newlines).

    Splits the raw byte stream itself, so lines longer than aiohttp's readline limit are fine.
    """
    chunks = content.iter_any() if isinstance(content, aiohttp.StreamReader) else content
    buffer = bytearray()
    data: list[str] = []
    async for chunk in chunks:
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(buffer[:end]).rstrip(b"\r").decode("utf-8")
            del buffer[:end + 1]
            if not line:  # a blank line ends the event
                if data:
                    yield "\n".join(data)
                    data = []
            elif line.startswith("data:"):
                value = line[5:]
                data.append(value.removeprefix(" "))
            # comments (":...") and event/id/retry fields are ignored
    if data:
        yield "\n".join(data)


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


def _check_url(base_url: str) -> None:
    try:
        url = yarl.URL(base_url)
        ok = url.scheme in ("http", "https") and bool(url.host) and url.port is not None
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise APIConnectionError(f"invalid server URL {base_url!r} (expected http://HOST:PORT)")


def _completion(body: dict[str, Any], chat: bool) -> Completion:
    try:
        choices = [CompletionChoice(
            index=c["index"],
            text=(c["message"].get("content") or "") if chat else c["text"],
            finish_reason=c.get("finish_reason"),
            logprobs=c.get("logprobs"),
        ) for c in body["choices"]]
        return Completion(body["id"], body["model"], choices, body.get("usage") or {}, body)
    except (KeyError, TypeError, AttributeError):
        raise APIResponseError(f"not an OpenAI completion: {str(body)[:200]}") from None


def _deltas(chunk: dict[str, Any], chat: bool) -> list[StreamDelta]:
    try:
        return _parse_deltas(chunk, chat)
    except (KeyError, TypeError, AttributeError):
        raise APIResponseError(f"not an OpenAI stream chunk: {str(chunk)[:200]}") from None


def _parse_deltas(chunk: dict[str, Any], chat: bool) -> list[StreamDelta]:
    choices = chunk.get("choices") or []
    if not choices:
        usage = chunk.get("usage")
        return [StreamDelta(index=0, text="", usage=usage)] if usage else []
    out = []
    for c in choices:
        if chat:
            delta = c.get("delta") or {}
            out.append(StreamDelta(c["index"], delta.get("content") or "", c.get("finish_reason"),
                                   delta.get("role"), c.get("logprobs")))
        else:
            out.append(StreamDelta(c["index"], c.get("text") or "", c.get("finish_reason"),
                                   None, c.get("logprobs")))
    return out
