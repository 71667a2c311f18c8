"""The door every HTTP request passes: request id, API key, body size, validation limits, and the
request counter and log line.

A pure ASGI middleware, not Starlette's `BaseHTTPMiddleware`: that one hands the app a `receive`
that runs in a task group of its own, so `Request.is_disconnected()` never sees a client leave
and an abandoned non-streamed answer went on generating. Here the app gets the server's own
`receive` once the body is read, so a disconnect reaches `serving._watch_disconnect`.

The body is read here, counting the bytes that actually arrive: `Content-Length` refuses a
declared oversized body at once, and a chunked one (no length) is cut off as soon as it passes
the limit, so neither is ever held whole.

JSON can carry what no text is: a lone UTF-16 surrogate (`"\\ud800"`). Python decodes it into a
string the tokenizer cannot take, so a body holding one is refused here with a 400 naming the
field, whichever API it is for."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

from starlette.routing import Route, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgevl.server.errors import error_response
from edgevl.server.metrics import Metrics
from edgevl.server.protocol import LIMITS

log = logging.getLogger("edgevl.server")
# exact paths; /web/ is static. The API's description is public: it says what is accepted, never any data.
OPEN_PATHS = {"/api/health", "/", "/favicon.ico", "/docs", "/redoc", "/openapi.json"}
_HIGH, _LOW = rb"\\u[dD][89abAB][0-9a-fA-F]{2}", rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}"
# a surrogate escape without its pair (a cheap look before parsing; the parse decides)
_LONE_ESCAPE = re.compile(rb"(?:%s)(?!%s)|(?<!%s)(?:%s)" % (_HIGH, _LOW, _HIGH, _LOW))
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_REQUEST_ID = re.compile(r"^[\w.:-]{1,64}$")  # a client's id is echoed in headers and logs: keep it tame


class _Gone(Exception):
    """The client left while sending its body."""


class Guard:
    def __init__(self, app: ASGIApp, *, keys: list[str], max_body: int, limits: dict, metrics: Metrics,
                 replica: str = ""):
        self.app, self.keys, self.max_body, self.limits = app, keys, max_body, limits
        self.metrics, self.replica = metrics, replica
        self._routes: dict[str, re.Pattern] | None = None  # every route's path → its regex

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given_id = headers.get("x-request-id", "")
        rid = given_id if _REQUEST_ID.match(given_id) else uuid.uuid4().hex[:16]
        t0 = time.perf_counter()
        LIMITS.set(self.limits)
        path: str = scope["path"]
        status = 500  # what the log says when the app fails before answering

        async def send_tagged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", rid.encode())]
                if self.replica:
                    extra.append((b"x-edgevl-replica", self.replica.encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            refusal = self._refusal(path, headers)
            if refusal is None:
                try:
                    body = await self._read_body(receive)
                except _Gone:
                    status = 499  # nginx's "client closed request": nobody is left to answer
                    return
                if body is None:
                    refusal = self._too_large(path, f"the body is over the limit of {self.max_body} bytes")
                elif (field := lone_surrogate(body)) is not None:
                    where = f"{field}: " if field else ""
                    refusal = error_response(path, f"{where}a lone UTF-16 surrogate is not text; send valid Unicode",
                                             "invalid_request_error", "invalid_parameter", field or None, 400)
            if refusal is not None:
                await refusal(scope, receive, send_tagged)
                return
            await self.app(scope, _replay(body, receive), send_tagged)
        finally:
            self._record(scope, path, status, rid, t0)

    def _refusal(self, path: str, headers: dict[str, str]):
        """A 401 or a 413 decided from the headers alone, or None."""
        if self.keys and path not in OPEN_PATHS and not path.startswith("/web/"):
            given = headers.get("authorization", "").removeprefix("Bearer ").strip() or headers.get("x-api-key", "")
            if not any(hmac.compare_digest(given.encode(), k.encode()) for k in self.keys):
                return error_response(path, "a valid API key is required (Authorization: Bearer KEY or x-api-key)",
                                      "authentication_error", "invalid_api_key", None, 401)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return self._too_large(path, f"the body is {int(length)} bytes; the limit is {self.max_body}")
        return None

    def _too_large(self, path: str, message: str):
        return error_response(path, message, "invalid_request_error", "payload_too_large", None, 413)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as more than `max_body` bytes have arrived."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Gone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _label(self, scope: Scope, path: str) -> str:
        """The route's path (its template, for a path with parameters), or "other": unknown paths
        (anyone can send them) must not each become a metrics series."""
        if self._routes is None:
            app = scope.get("app")
            paths = {r.path for r in getattr(app, "routes", []) if isinstance(r, Route)}
            try:  # the included routers' paths; a schema that fails to build must not fail every request
                paths |= set(app.openapi().get("paths", {}))
            except Exception:
                log.warning("no OpenAPI schema: metrics label only the app's top-level routes", exc_info=True)
            self._routes = {p: compile_path(p)[0] for p in paths}
        if path in self._routes:
            return path
        return next((p for p, regex in self._routes.items() if "{" in p and regex.match(path)), "other")

    def _record(self, scope: Scope, path: str, status: int, rid: str, t0: float) -> None:
        self.metrics.requests.labels(self._label(scope, path), str(status)).inc()
        ms = round((time.perf_counter() - t0) * 1000, 1)
        log.info("%s %d %.1f ms [%s]", path, status, ms, rid,
                 extra={"request_id": rid, "path": path, "status": status, "ms": ms})


def lone_surrogate(body: bytes) -> str | None:
    """Where in a JSON body a string (or key) holds a lone surrogate ("messages.0.content"), or None."""
    if not _LONE_ESCAPE.search(body):
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None  # not JSON: the route says so

    def find(value: object, path: str) -> str | None:
        if isinstance(value, str):
            return path if _SURROGATE.search(value) else None
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for k, v in items:
            here = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and _SURROGATE.search(k):
                return path
            if (found := find(v, here)) is not None:
                return found
        return None

    return find(doc, "")


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read above as one message, then the server's own `receive` (which reports a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
