"""Who may read and who may change: the dashboard's token, and what a request may send.

Reads are open when the server listens on loopback only; on any other address they need the token
too (header, ``?token=`` once, then a cookie). Mutations always need it, from a header
(``Authorization: Bearer TOKEN`` or ``X-Stemstream-Token: TOKEN``): :class:`RequestGuard` refuses
a mutation without it before anything of its body is read, and any body over ``MAX_BODY_BYTES``.
"""

from __future__ import annotations

import collections
import hmac

from fastapi import HTTPException, Request, WebSocket
from fastapi.responses import JSONResponse, RedirectResponse

TOKEN_COOKIE = "stemstream_token"
#: The largest request body taken: the API's bodies are small maps (``POST /api/scans``).
MAX_BODY_BYTES = 1 << 20
#: Methods that change something: the token first, then the body.
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def error_response(status: int, message: str) -> JSONResponse:
    """Every error of the dashboard's API: ``{"error": message, "status": status}``."""
    return JSONResponse({"error": message, "status": status}, status_code=status)


def _header_token(conn: Request | WebSocket) -> str:
    auth = conn.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return conn.headers.get("x-stemstream-token") or ""


def _given_token(conn: Request | WebSocket) -> str:
    """For reads: a header, ``?token=`` or the cookie a link with the token left."""
    return _header_token(conn) or conn.query_params.get("token") or conn.cookies.get(TOKEN_COOKIE) or ""


class Access:
    """The token, and whether reads need it (not when the server listens on loopback only)."""

    def __init__(self, token: str, open_reads: bool):
        if not token:
            raise ValueError("the dashboard needs a token")
        self.token = token
        self.open_reads = open_reads

    def token_ok(self, given: str) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    def may_read(self, conn: Request | WebSocket) -> bool:
        return self.open_reads or self.token_ok(_given_token(conn))

    def mutation_refusal(self, request: Request) -> tuple[int, str] | None:
        """Why a request that changes something is refused, (status, message); None when its
        headers carry the token. Only a header counts: a browser never adds one by itself, so
        another site cannot make a visitor's browser start or delete anything."""
        given = _header_token(request)
        if not given:
            return 401, "this request changes something: send the dashboard's token (Authorization: Bearer TOKEN)"
        if not self.token_ok(given):
            return 403, "the token is wrong"
        return None

    def require_read(self, request: Request) -> None:
        if self.open_reads:
            return
        given = _given_token(request)
        if not given:
            raise HTTPException(401, "this dashboard listens beyond this machine: reading needs the token "
                                     "(open the address with ?token=TOKEN once)")
        if not self.token_ok(given):
            raise HTTPException(403, "the token is wrong")

    async def token_cookie(self, request: Request, call_next):
        """Middleware: ``?token=`` on a page sets the cookie, so a link with the token works once
        and then the address bar no longer shows it."""
        given = request.query_params.get("token")
        if given and request.method == "GET" and not request.url.path.startswith("/api/") and self.token_ok(given):
            response = RedirectResponse(request.url.remove_query_params("token"), status_code=303)
            response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict")
            return response
        return await call_next(request)


def require_read(request: Request) -> None:
    """Route handlers call this first: 401/403 when reads need the token and it is missing/wrong.
    (Called in the handler, not as a dependency, so a bad parameter is still a 422 first.)"""
    request.app.state.access.require_read(request)


class RequestGuard:
    """ASGI middleware before every route: a mutation (MUTATING) without the token is refused
    before its body is read; a body over ``limit`` bytes gets 413, unread when its Content-Length
    says so, else as soon as the bytes received pass the limit. The body of a request that passes
    is handed on as it came."""

    def __init__(self, app, access: Access, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.access = access
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)  # the headers only
        refusal = self.access.mutation_refusal(request) if request.method in MUTATING else None
        refusal = refusal or self._declared_too_big(request.headers.get("content-length"))
        messages = None
        if refusal is None:
            messages = await self._read(receive)
            if messages is None:
                refusal = 413, self._too_big
        if refusal is not None:
            await error_response(*refusal)(scope, receive, send)
            return

        async def replay():
            return messages.popleft() if messages else await receive()

        await self.app(scope, replay, send)

    @property
    def _too_big(self) -> str:
        return f"the request body is over {self.limit:,} bytes: the dashboard takes small maps"

    def _declared_too_big(self, length: str | None) -> tuple[int, str] | None:
        if length is None:
            return None
        if not length.isdigit():
            return 400, "the Content-Length header is not a number"
        return (413, self._too_big) if len(length) > 18 or int(length) > self.limit else None

    async def _read(self, receive) -> collections.deque | None:
        """The body's messages, or None once they pass the limit (the rest is left unread)."""
        messages, size = collections.deque(), 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client went away: the route hears it
                return messages
            size += len(message.get("body", b""))
            if size > self.limit:
                return None
            if not message.get("more_body", False):
                return messages
