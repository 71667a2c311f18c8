"""One status table, and each API's own error shape: OpenAI's {"error": {"message", "type", "param", "code"}}
by default; a dialect mounted under a path prefix registers its shape (`register_shape`), and every
error under that prefix (validation, auth, body size, engine faults) is rendered in it."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgevl.preprocess.image import ImageError
from edgevl.preprocess.video import VideoError
from edgevl.types import EngineError, InputError


class ApiError(Exception):
    """Raised anywhere in the server; rendered by the handler below. Never matched on message text."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, code: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.code, self.param, self.headers = message, code, param, headers or {}


class NotFound(ApiError):
    status = 404


class PayloadTooLarge(ApiError):
    status = 413


class QueueFull(ApiError):
    status, type = 429, "rate_limit_error"


class Unavailable(ApiError):
    status, type = 503, "service_unavailable"


class Timeout(ApiError):
    status, type = 504, "timeout"


class ServerFault(ApiError):
    status, type = 500, "server_error"


_STATUS_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def error_body(message: str, type_: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# (message, type, code, param, status) → the body a dialect's clients expect
Shape = Callable[[str, str, str, "str | None", int], dict]
_SHAPES: list[tuple[str, Shape]] = []


def register_shape(prefix: str, shape: Shape) -> None:
    """Errors for paths under `prefix` are rendered by `shape` (the longest matching prefix wins)."""
    _SHAPES.append((prefix, shape))
    _SHAPES.sort(key=lambda p: -len(p[0]))


def error_response(path: str, message: str, type_: str, code: str, param: str | None, status: int,
                   headers: dict | None = None) -> JSONResponse:
    """The error in the shape of the API that `path` belongs to."""
    for prefix, shape in _SHAPES:
        if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
            return JSONResponse(shape(message, type_, code, param, status), status, headers=headers)
    return JSONResponse(error_body(message, type_, code, param), status, headers=headers)


def render(path: str, err: ApiError) -> JSONResponse:
    return error_response(path, err.message, err.type, err.code, err.param, err.status, err.headers or None)


def as_api_error(exc: Exception) -> ApiError:
    """Typed exceptions from below the server → the API's error, by type only."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ImageError):
        err = ApiError(str(exc), exc.code, exc.param or ("video" if isinstance(exc, VideoError) else "image"))
        if exc.code in ("image_too_large", "video_too_large", "video_too_long"):
            err.status = 413
        return err
    if isinstance(exc, InputError):
        return ApiError(str(exc), exc.code, exc.param)
    if isinstance(exc, EngineError):
        return ServerFault(f"generation failed: {exc}", "engine_error")
    return ServerFault("internal error", "internal_error")


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return render(request.url.path, exc)

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> JSONResponse:
        return render(request.url.path, as_api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            return error_response(request.url.path, f"the body is not valid JSON: {msg}", "invalid_request_error",
                                  "invalid_json", None, 400)
        where = ".".join(loc)
        return error_response(request.url.path, f"{where}: {msg}" if where else msg, "invalid_request_error",
                              "invalid_parameter", where or None, 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        return error_response(request.url.path, str(exc.detail), "invalid_request_error", code, None, exc.status_code,
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception) -> JSONResponse:
        e = as_api_error(exc)
        if e.status >= 500:
            logging.getLogger("edgevl.server").error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return render(request.url.path, e)
