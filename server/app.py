"""create_app: the FastAPI app over one engine. Routes, error mapping, lifespan and disconnect handling.

Errors always leave in OpenAI's shape: request validation (FastAPI's 422) becomes 400 with `param` set to the
offending field, unknown routes 404, anything unexpected 500. The generation endpoints race the handler against
`http.disconnect` (`server.disconnect`, like vLLM's `with_cancellation`), so a client that goes away cancels the
handler, which aborts its engine sequences and frees their KV blocks.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import __version__
from server.async_engine import AsyncEngine, EngineDeadError
from server.config import ServerConfig
from server.disconnect import race_disconnect
from server.metrics import CONTENT_TYPE
from server.middleware import APIKeyMiddleware, BodyLimitMiddleware
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, error_body
from server.serving import APIError, OpenAIServing

MAX_REPORTED_ERRORS = 10  # as vLLM; the request models fail fast (protocol.py), so few are ever built


def _field_of(err: dict[str, Any], loc: list[str]) -> str | None:
    """The request field a validation error is about, for the error's `param`."""
    if err.get("type") == "json_invalid":
        return None  # its loc is a character offset
    if loc:
        return loc[0]
    named = (err.get("ctx") or {}).get("param")  # a body-level error (protocol.RequestBody) names it here
    return None if named is None else str(named)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    parts, param = [], None
    for err in exc.errors()[:MAX_REPORTED_ERRORS]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        named = _field_of(err, loc)
        if param is None and named:
            param = str(named)
        parts.append(f"{'.'.join(loc) or named or 'body'}: {err.get('msg', 'invalid')}")
    return JSONResponse(error_body(400, "; ".join(parts) or "invalid request", param), 400)


async def with_cancellation(request: Request, handler: Awaitable[Response], async_engine: AsyncEngine) -> Response:
    """Run `handler`, cancelling it as soon as the client disconnects (counted in /metrics)."""
    done = await race_disconnect(handler, request.receive)
    if done is not None:
        return done.result()
    async_engine.metrics.client_disconnected.labels(async_engine.metrics.model_name).inc()
    return Response(status_code=499)  # nobody is listening


def create_app(engine: Any, config: ServerConfig | None = None) -> FastAPI:
    """Build the app over an Engine (run in a thread) or an EngineProcess; the engine loop follows the lifespan."""
    config = config or ServerConfig()
    async_engine = AsyncEngine(engine, config.served_model_name, config.max_queued_requests, config.max_queued_tokens,
                       max_queued_kv_factor=config.max_queued_kv_factor,
                       engine_restart_attempts=config.engine_restart_attempts,
                       engine_restart_backoff=config.engine_restart_backoff, stall_timeout=config.stall_timeout,
                       ready_cache_seconds=config.ready_cache_seconds)
    metrics = async_engine.metrics
    model_name = metrics.model_name
    serving = OpenAIServing(async_engine, config, metrics, model_name)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            async_engine.stop()

    app = FastAPI(title="trimode", version=__version__, lifespan=lifespan)
    app.state.async_engine = async_engine
    app.state.config = config

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), 500)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await with_cancellation(request, serving.completions(req), async_engine)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await with_cancellation(request, serving.chat(req), async_engine)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "trimode", "root": model_name,
                "parent": None, "max_model_len": async_engine.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        serving.check_model(model)
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        problem = async_engine.health_problem()  # dead, being respawned, or stalled with work in flight
        if problem is not None:
            return JSONResponse(error_body(503, problem), 503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        why = async_engine.health_problem() or ("The server is draining." if async_engine.draining else None)
        if why is not None:
            return JSONResponse(error_body(503, why), 503)
        try:  # answered by a forward within ready_cache_seconds, or one probe shared by concurrent callers
            await async_engine.probe(config.probe_timeout)
        except Exception as exc:
            return JSONResponse(error_body(503, f"probe forward failed: {type(exc).__name__}"), 503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        snap = async_engine.snapshot
        metrics.set_gauges(snap.num_running, snap.num_waiting, snap.kv_cache_usage)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/load")
    async def load() -> dict[str, int]:
        return {"server_load": async_engine.num_inflight}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        """As vLLM: forget the engine's cached KV blocks; requests sent after the 200 never reuse them."""
        try:
            async_engine.reset_prefix_cache()
        except EngineDeadError:
            raise APIError(503, "The engine is dead; there is no prefix cache to reset.") from None
        return Response(status_code=200)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            tokens = await serving.chat_ids(req.messages)
        else:
            assert req.prompt is not None
            tokens = await serving.encode(req.prompt, "prompt", req.add_special_tokens)
        return {"count": len(tokens), "max_model_len": async_engine.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, str]:
        serving.check_model(req.model)
        tok = serving.require_tokenizer("tokens")
        vocab = len(tok)
        # decoding runs on the event loop: bound it as a prompt is bounded
        if len(req.tokens) > async_engine.max_model_len:
            raise APIError(400, f"tokens holds {len(req.tokens)} ids, more than this model's maximum context "
                           f"length of {async_engine.max_model_len}", "tokens")
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": tok.decode(req.tokens)}

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=config.max_body_bytes,
                       on_reject=lambda: metrics.reject("body_too_large"))
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    return app
