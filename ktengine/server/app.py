"""The aiohttp application: routes, auth, error shaping, and the model loading in the background.

The port opens at once and /health answers 503 while the model loads in a worker thread;
everything under /v1 answers 503 until then. Handlers are cancelled when their client
disconnects (aiohttp's handler_cancellation), which aborts the engine requests they started.
"""
from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from ktengine.config import EngineConfig
from ktengine.errors import KtengineError
from ktengine.server.errors import APIError, error_response
from ktengine.server.metrics import Metrics
from ktengine.server.serving import OpenAIServing

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 2**20
SHUTDOWN_GRACE_S = 2.0  # how long a shutdown waits for requests still being received
_OPEN_PATHS = frozenset({"/health"})  # answered without an API key


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES


@dataclass
class ServerState:
    """What the handlers share: the engine (None while loading) and the metrics."""

    config: ServerConfig
    metrics: Metrics = field(default_factory=Metrics)
    engine: Any | None = None
    serving: OpenAIServing | None = None
    load_error: BaseException | None = None
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = field(default_factory=time.time)
    closing: bool = False  # shutting down: the engine is gone or going

    def require_engine(self) -> Any:
        if self.closing:
            raise APIError(503, "the server is shutting down", None, "server_shutting_down")
        if self.engine is None:
            raise APIError(503, "the model is still loading; retry when /health answers 200",
                           None, "model_loading")
        return self.engine


STATE = web.AppKey("state", ServerState)


def create_app(engine_factory: Callable[[], Any], config: ServerConfig | None = None) -> web.Application:
    """An application whose engine is built by `engine_factory` (blocking) in a worker thread."""
    state = ServerState(config or ServerConfig())
    app = web.Application(middlewares=[_error_middleware, _auth_middleware],
                          client_max_size=state.config.max_body_bytes)
    app[STATE] = state
    app.cleanup_ctx.append(_engine_context(engine_factory))
    app.on_shutdown.append(_shutdown_engine)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model:.+}", _model)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    for action in ("start", "stop", "dump"):
        path = f"/{action}_expert_distribution_record"
        app.router.add_route("GET", path, _recorder(action))
        app.router.add_route("POST", path, _recorder(action))
    return app


def _engine_context(engine_factory: Callable[[], Any]):
    async def context(app: web.Application):
        state = app[STATE]

        async def load() -> None:
            try:
                engine = await asyncio.get_running_loop().run_in_executor(None, engine_factory)
            except BaseException as exc:  # noqa: BLE001 - reported by run_server, not swallowed
                state.load_error = exc
            else:
                state.engine, state.serving = engine, OpenAIServing(engine, state.metrics)
                log.info("model %s ready", engine.model_name)
            state.loaded.set()

        task = asyncio.get_running_loop().create_task(load(), name="ktengine-load")
        yield
        if not task.done():  # shutting down while loading: let the thread finish, then close
            await asyncio.gather(task, return_exceptions=True)
        await _shutdown_engine(app)

    return context


async def _shutdown_engine(app: web.Application) -> None:
    """Aborts every request (open streams end with finish_reason "abort") and frees the engine.

    Runs at on_shutdown, before aiohttp waits for the handlers, so open streams do not hold
    the shutdown up; again at cleanup, where it does nothing.
    """
    state = app[STATE]
    state.closing = True
    engine, state.engine = state.engine, None
    if engine is not None:
        await engine.shutdown()


# -- middlewares --------------------------------------------------------------------------------

@web.middleware
async def _error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    metrics = request.app[STATE].metrics
    try:
        return await handler(request)
    except APIError as exc:
        metrics.count_error(exc.status)
        return error_response(exc.status, exc.message, exc.param, exc.code)
    except web.HTTPRequestEntityTooLarge:
        metrics.count_error(413)
        limit = request.app[STATE].config.max_body_bytes
        return error_response(413, f"the request body is larger than {limit} bytes", None,
                              "request_too_large")
    except web.HTTPException as exc:  # 404 no such route, 405 wrong method, ...
        if exc.status < 400:
            raise
        metrics.count_error(exc.status)
        message = f"{exc.reason}: {request.method} {request.path}"
        response = error_response(exc.status, message, None, exc.reason.lower().replace(" ", "_"))
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        metrics.count_error(500)
        return error_response(500, "internal server error; see the server log", None,
                              "internal_error")


@web.middleware
async def _auth_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    key = request.app[STATE].config.api_key
    if key is not None and request.path not in _OPEN_PATHS:
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           None, "invalid_api_key")
    length = request.content_length
    if length is not None and length > request.app[STATE].config.max_body_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=request.app[STATE].config.max_body_bytes,
                                            actual_size=length)
    return await handler(request)


# -- handlers -----------------------------------------------------------------------------------

def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.closing:
        return _json({"status": "shutting_down"}, 503)
    if state.engine is None:
        return _json({"status": "loading"}, 503)
    if state.engine.failure is not None:  # it refuses requests: let a supervisor restart it
        return _json({"status": "failed", "error": state.engine.failure}, 503)
    return _json({"status": "ok", "model": state.engine.model_name})


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.Response(text=state.metrics.render(state.engine),
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def _model_card(state: ServerState) -> dict:
    engine = state.require_engine()
    return {"id": engine.model_name, "object": "model", "created": int(state.started),
            "owned_by": "ktengine", "max_model_len": engine.max_model_len}


async def _models(request: web.Request) -> web.Response:
    return _json({"object": "list", "data": [_model_card(request.app[STATE])]})


async def _model(request: web.Request) -> web.Response:
    card = _model_card(request.app[STATE])
    name = request.match_info["model"]
    if name != card["id"]:
        raise APIError(404, f"model {name!r} not found; this server serves {card['id']!r}",
                       "model", "model_not_found")
    return _json(card)


async def _chat(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.require_engine()
    return await state.serving.chat(request)


async def _completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.require_engine()
    return await state.serving.completions(request)


def _recorder(action: str):
    async def handler(request: web.Request) -> web.Response:
        engine = request.app[STATE].require_engine()
        recorder = getattr(engine, "recorder", None)
        if recorder is None:
            raise APIError(400, "the expert distribution recorder is off; start the server with "
                                "--expert-distribution-recorder-mode", None, "recorder_off")
        try:
            result = getattr(recorder, action)()
            if inspect.isawaitable(result):
                result = await result
        except (KtengineError, ValueError, RuntimeError) as exc:
            raise APIError(400, f"{action}_expert_distribution_record: {exc}", None,
                           "recorder_error") from None
        body: dict[str, Any] = {"status": "ok", "action": action}
        if action == "dump":
            body["path"] = str(result)
        return _json(body)

    return handler


# -- running ------------------------------------------------------------------------------------

def run_server(args: Any, engine_config: EngineConfig) -> int:
    """`ktengine serve`: listen at once, load the model in the background, serve until a signal."""
    from ktengine.engine import AsyncEngine

    config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key)
    if not 0 <= config.port <= 65535:
        raise KtengineError(f"--port must be between 0 and 65535, got {config.port}")
    if config.api_key is not None and not config.api_key.strip():
        raise KtengineError("--api-key must not be empty (leave it out to serve without a key)")
    def load() -> AsyncEngine:
        engine = AsyncEngine(engine_config, progress=True)
        engine.warm_up_kernels()  # before the first request, not during it
        engine.capture_decode_graphs()
        return engine

    return asyncio.run(serve(load, config))


def _exit_now(sig: signal.Signals) -> None:
    log.warning("%s during the shutdown: exiting now", signal.Signals(sig).name)
    logging.shutdown()
    os._exit(128 + sig)


async def serve(engine_factory: Callable[[], Any], config: ServerConfig,
                signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> int:
    """Serves until one of `signals` arrives; raises KtengineError if the model fails to load."""
    app = create_app(engine_factory, config)
    state = app[STATE]
    loop = asyncio.get_running_loop()
    # open streams end at once on shutdown (the engine aborts them); the grace period is for
    # a request still uploading its body
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=1024)
        try:
            await site.start()
        except socket.gaierror:  # a name that does not resolve, or no address at all
            raise KtengineError(f"cannot listen on {config.host}:{config.port}: {config.host!r} "
                                "is not an address or a host name of this machine") from None
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise KtengineError(f"cannot listen on {config.host}:{config.port}: {reason}") from None
        log.info("listening on http://%s:%d (loading the model; /health answers 503 until ready)",
                 config.host, config.port)
        stop = asyncio.Event()
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(state.loaded.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if state.load_error is None and not stop.is_set():
                await waits[0]
        finally:
            for w in waits:
                w.cancel()
        if stop.is_set():
            log.info("shutting down (a second signal exits at once)")
        for sig in signals:  # during the shutdown: a second signal means now
            loop.add_signal_handler(sig, _exit_now, sig)
    finally:
        try:
            await runner.cleanup()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
    if state.load_error is not None:
        exc = state.load_error
        if isinstance(exc, KtengineError):
            raise KtengineError(f"cannot load the model: {exc}")
        raise KtengineError(f"cannot load the model: {type(exc).__name__}: {exc}") from exc
    return 0
