"""The HTTP API server every frontend also is, with `--http-port`: one FastAPI app (uvicorn, on the
frontend's own uvloop loop) over one listening socket that launch made and every frontend accepts on.

Routes are thin mappings from a dialect's schema onto the same client calls a Python client makes
(`openai.py`, `vllm.py`, `sglang.py`, `metrics.py`): the app talks to its own frontend through an
`AsyncClient` on an in-process socket, so no engine logic lives here. This module holds what every
dialect shares: the context, authentication, the body limit, and error objects (OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the status the error calls for).
"""

import asyncio
import contextlib
import hmac
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from frontend.client import AsyncClient
from frontend.tokenizer import Tokenizer
from protocol.errors import EngineDeadError, EnginePausedError, InvalidRequestError, UtilityError

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20
OPEN_PATHS = frozenset({"/health", "/metrics"})  # need no API key (load balancers, Prometheus)
RETRY_AFTER_S = "1"
STOP_TIMEOUT_S = 5.0


@dataclass
class HttpContext:
    """What the routes of every dialect use."""

    client: AsyncClient  # this frontend's own clients' socket
    tokenizer: Tokenizer
    model_name: str
    model_path: str
    max_model_len: int
    api_key: str | None = None
    reject_while_paused: bool = False  # the engine's policy (the SGLang dialect holds regardless)
    started: float = field(default_factory=time.time)


class ApiError(Exception):
    """An error answered as an OpenAI error object with `status`."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.kind, self.param)


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def api_error(error: Exception) -> ApiError:
    """The HTTP face of an engine error."""
    match error:
        case ApiError():
            return error
        case EnginePausedError():
            return ApiError(503, str(error), "service_unavailable")
        case EngineDeadError():
            return ApiError(503, str(error), "engine_dead")
        case InvalidRequestError():
            return ApiError(400, str(error))
        case UtilityError():
            return ApiError(400, str(error))
        case TimeoutError():
            return ApiError(504, str(error), "timeout")
    return ApiError(500, f"{type(error).__name__}: {error}", "internal_error")


def check_model(ctx: HttpContext, model: str | None) -> None:
    """A request naming another model is a 404, as vLLM answers it."""
    if model is not None and model != ctx.model_name:
        raise ApiError(404, f"The model `{model}` does not exist (this server serves `{ctx.model_name}`).",
                       "NotFoundError", "model")  # fmt: skip


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query")]
    param = ".".join(location) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return error_response(400, message, "invalid_request_error", param)


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    mapped = api_error(error)
    if mapped.status >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, mapped.message)
    return mapped.response()


class Guard:
    """ASGI middleware: the API key (every route but OPEN_PATHS), and the body size limit (a
    declared length over it is refused at once, a streamed body once it passes it)."""

    def __init__(self, app: Callable, api_key: str | None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        refusal = None
        declared = headers.get(b"content-length")
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            refusal = error_response(401, "missing or wrong API key (Authorization: Bearer ...)", "unauthorized")
        elif declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            refusal = self._too_large().response()
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, self._limited(receive), send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"authorization", b"").decode(errors="replace")
        return hmac.compare_digest(given, f"Bearer {self.api_key}")

    def _limited(self, receive: Callable) -> Callable:
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise self._too_large()
            return message

        return limited

    def _too_large(self) -> "ApiError":
        return ApiError(413, f"the request body is over {self.max_body_bytes} bytes", "request_too_large")


def build_app(ctx: HttpContext, routers: list[Any]) -> Any:
    app = FastAPI(title="zeroserve", docs_url=None, redoc_url=None)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for kind in (ApiError, EnginePausedError, EngineDeadError, InvalidRequestError, UtilityError, TimeoutError):
        app.add_exception_handler(kind, _api_error)
    for router in routers:
        app.include_router(router)
    return Guard(app, ctx.api_key)


class _Server(uvicorn.Server):
    """uvicorn inside the frontend's loop: the frontend owns SIGTERM and SIGINT, not uvicorn."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class HttpServer:
    """`app` served on the listening socket every frontend inherited from launch."""

    def __init__(self, app: Any, listening: socket.socket) -> None:
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=5)
        self._server = _Server(config)
        self._listening = listening

    async def run(self) -> None:
        await self._server.serve(sockets=[self._listening])

    async def stop(self, serving: "asyncio.Task[None]") -> None:
        """Stop accepting, give open requests a moment, then end."""
        self._server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(serving, STOP_TIMEOUT_S)
