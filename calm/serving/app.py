"""The HTTP routes (FastAPI): GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Each POST is parsed and checked here (malformed JSON, wrong types, out-of-range values and unsupported
parameters are a 400 naming the field), turned into an engine request (calm.serving.prepare), submitted to
the engine thread (a full server is a 429 with Retry-After), and answered whole or as server-sent events
ending in `data: [DONE]`. A client that leaves cancels its request, so its slot frees at the next step."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from calm.errors import CalmError
from calm.serving.engine_loop import EngineLoop, Job, QueueFull, ShuttingDown
from calm.serving.prepare import COMPLETION_MAX_TOKENS, chat_ids, completion_ids, prepare
from calm.serving.protocol import ChatRequest, CompletionRequest, Sampling, ServingError, error_body, field_name
from calm.serving.responses import Progress, Shape
from calm.serving.text import TextStream

if TYPE_CHECKING:
    from calm.model import CalmModel

logger = logging.getLogger("calm")
RETRY_AFTER_S = 1  # what a 429 tells the client to wait
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


class EngineFailed(Exception):
    """The engine ended a request with an error (a failed step, or shutdown)."""


def create_app(
    model: CalmModel, engine: EngineLoop, model_name: str, lossless: str = "lossless: full model"
) -> FastAPI:
    """The FastAPI app over a model and its engine loop; the app starts and stops the loop. lossless: what a
    lossless request runs, in words (calm.serving.server.lossless_decoding)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="calm serve", lifespan=lifespan)
    app.state.model, app.state.engine, app.state.model_name = model, engine, model_name
    app.state.lossless = lossless

    @app.exception_handler(ServingError)
    async def refused(request: HttpRequest, exc: ServingError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status in (429, 503) else None
        return JSONResponse(error_body(str(exc), exc.kind, exc.param), status_code=exc.status, headers=headers)

    @app.exception_handler(Exception)
    async def failed(request: HttpRequest, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "in_flight": engine.in_flight, "steps": engine.steps, **engine.stats()})

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "calm"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Response:
        body = await parse(request, CompletionRequest)
        return await answer(app, request, body, completion_ids(model, body), COMPLETION_MAX_TOKENS, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Response:
        body = await parse(request, ChatRequest)
        return await answer(app, request, body, chat_ids(model, body), None, chat=True)

    return app


async def parse(request: HttpRequest, schema: type[Sampling]) -> Any:
    """The body as `schema`, or a 400 saying what is wrong and where."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ServingError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ServingError(f"the body must be a JSON object, got {type(data).__name__}")
    try:
        body = schema.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = field_name(error["loc"])
        message = "unsupported parameter" if error["type"] == "extra_forbidden" else error["msg"]
        raise ServingError(f"{name}: {message}", param=name) from None
    body.refuse_unsupported()
    return body


async def answer(
    app: FastAPI, request: HttpRequest, body: Sampling, ids: list[int], default_budget: int | None, chat: bool
) -> Response:
    model, engine, name = app.state.model, app.state.engine, app.state.model_name
    if body.model is not None and body.model != name:
        raise ServingError(
            f"model {body.model!r} is not served here; this server serves {name!r}", 404, "model", "not_found_error"
        )
    try:
        prepared = prepare(model, body, ids, default_budget, app.state.lossless)
    except CalmError as exc:
        raise exc if isinstance(exc, ServingError) else ServingError(str(exc)) from None
    try:
        job = engine.submit(prepared.request, asyncio.get_running_loop())
    except QueueFull as exc:
        raise ServingError(f"{exc}; retry later", 429, kind="rate_limit_error") from None
    except ShuttingDown as exc:
        raise ServingError(str(exc), 503, kind="server_error") from None
    progress, shape = Progress(prepared, model.num_layers), Shape.new(chat, name)
    texts = pieces(engine, job, TextStream(model.tokenizer, body.stops), progress)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(events(texts, shape, progress, usage), media_type="text/event-stream")
    text = await until_disconnected(request, join(texts))
    return JSONResponse(shape.whole(text, progress))


async def pieces(engine: EngineLoop, job: Job, stream: TextStream, progress: Progress) -> AsyncIterator[str]:
    """The request's text as it comes; progress records its tokens and why it ended. Whoever stops
    reading (a client that left) cancels the request."""
    try:
        while progress.finish_reason is None:
            update = await job.updates.get()
            if update.error is not None:
                raise EngineFailed(update.error)
            text = stream.push(update.tokens)
            progress.record(update, stream.counted_tokens)
            if stream.stopped or update.finish_reason is not None:
                progress.finish_reason = "stop" if stream.stopped else update.finish_reason
                text += stream.finish()
            if text:
                yield text
    finally:
        if not job.cancelled and (progress.finish_reason is None or stream.stopped):
            engine.cancel(job)  # the client left, the engine failed, or a stop string ended it first


async def join(texts: AsyncIterator[str]) -> str:
    return "".join([text async for text in texts])


async def until_disconnected(request: HttpRequest, work: Any) -> str:
    """Await `work`, cancelling it (and so its request) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            try:
                return task.result()
            except EngineFailed as exc:
                raise ServingError(str(exc), 500, kind="server_error") from None
        if await request.is_disconnected():
            task.cancel()
            raise asyncio.CancelledError


async def events(texts: AsyncIterator[str], shape: Shape, progress: Progress, usage: bool) -> AsyncIterator[str]:
    """Server-sent events: the role, each piece of text, the finish reason with the calm object, the usage
    when asked (stream_options.include_usage), then [DONE]. An engine failure is sent as an error event."""
    extra: dict = {"usage": None} if usage else {}
    sse: Callable[[dict], str] = lambda data: f"data: {json.dumps(data)}\n\n"
    if shape.chat:
        yield sse({**shape.chunk("", first=True), **extra})
    try:
        async for text in texts:
            yield sse({**shape.chunk(text), **extra})
    except EngineFailed as exc:
        yield sse(error_body(str(exc), "server_error"))
        yield "data: [DONE]\n\n"
        return
    yield sse({**shape.last_chunk(progress), **extra})
    if usage:
        yield sse(shape.usage_chunk(progress))
    yield "data: [DONE]\n\n"
