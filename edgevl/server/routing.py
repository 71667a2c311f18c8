"""Routes whose failures never escape the app: any exception becomes the API's error.

Starlette hands an exception that reaches its outermost layer to the handler and then re-raises
it, so the server logs a traceback and drops the client's keep-alive connection. Raising an
ApiError instead keeps it inside the exception middleware, which answers and carries on."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from edgevl.server.errors import ApiError, as_api_error

log = logging.getLogger("edgevl.server")


class SafeRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def safe(request: Request) -> Response:
            try:
                return await handler(request)
            except (ApiError, RequestValidationError, HTTPException):
                raise
            except Exception as e:
                err = as_api_error(e)
                if err.status >= 500:
                    log.error("%s %s failed", request.method, request.url.path, exc_info=e)
                raise err from e

        return safe
