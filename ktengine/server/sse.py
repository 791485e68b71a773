"""Server-sent events: `data: {json}\\n\\n` frames, ended by `data: [DONE]`.

Each write waits for the transport to drain (aiohttp's backpressure), so a slow reader holds
at most a few frames here; the engine merges the increments it has not yet taken.
"""
from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}


class EventStream:
    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response = web.StreamResponse(status=200, headers=HEADERS)

    async def start(self) -> None:
        await self.response.prepare(self._request)

    async def send(self, payload: dict[str, Any]) -> None:
        await self.response.write(b"data: " + orjson.dumps(payload) + b"\n\n")

    async def done(self) -> None:
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
