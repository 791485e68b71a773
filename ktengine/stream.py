"""RequestStream, the async iterator of one request's outputs, and `collect`, which runs one
to its end. The engine (engine.py) feeds the streams from its event loop."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ktengine.request import RequestOutput, Sequence

if TYPE_CHECKING:
    from ktengine.engine import AsyncEngine


class RequestStream:
    """Async iterator over one request's outputs. Leaving the loop early aborts the request."""

    def __init__(self, engine: AsyncEngine, seq: Sequence) -> None:
        self.request_id = seq.request_id
        self._engine = engine
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._done = False

    def _put(self, out: RequestOutput) -> None:
        prev = self._pending
        if prev is not None:  # reader is behind: merge the increments
            out.delta_text = prev.delta_text + out.delta_text
            out.delta_token_ids = prev.delta_token_ids + out.delta_token_ids
            if prev.delta_logprobs is not None and out.delta_logprobs is not None:
                out.delta_logprobs = prev.delta_logprobs + out.delta_logprobs
            if prev.delta_top_logprobs is not None and out.delta_top_logprobs is not None:
                out.delta_top_logprobs = prev.delta_top_logprobs + out.delta_top_logprobs
        self._pending = out
        self._ready.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        await self._ready.wait()
        self._ready.clear()
        if self._error is not None:
            self._done = True
            raise self._error
        out, self._pending = self._pending, None
        assert out is not None
        self._done = out.finished
        return out

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)

    def __del__(self) -> None:
        # the last reference may drop inside the engine's own callbacks (it holds the stream
        # weakly): the abort runs on the event loop's next turn, not in the middle of them
        if not self._done and self._engine._thread is not None:
            self._engine.abort_soon(self.request_id)


async def collect(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """Runs a stream to its end and returns the last output (with the full text)."""
    last = None
    logprobs: list[float] = []
    top: list[dict[int, float]] = []
    async for out in stream:
        if out.delta_logprobs is not None:
            logprobs += out.delta_logprobs
            top += out.delta_top_logprobs or []
        last = out
    assert last is not None
    if last.delta_logprobs is not None:
        last.delta_logprobs, last.delta_top_logprobs = logprobs, top
    return last
