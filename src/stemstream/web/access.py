"""Who may read and who may change: the dashboard's token.

Reads are open when the server listens on loopback only; on any other address they need the token
too (header, ``?token=`` once, then a cookie). Mutations always need it, from a header
(``Authorization: Bearer TOKEN`` or ``X-Stemstream-Token: TOKEN``).
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, WebSocket
from fastapi.responses import RedirectResponse

TOKEN_COOKIE = "stemstream_token"


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

    def require_token(self, request: Request) -> None:
        """Mutations take the token from a header only: a browser never adds one by itself, so
        another site cannot make a visitor's browser start or delete anything."""
        given = _header_token(request)
        if not given:
            raise HTTPException(401, "this request changes something: send the dashboard's token "
                                     "(Authorization: Bearer TOKEN)")
        if not self.token_ok(given):
            raise HTTPException(403, "the token is wrong")

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


def require_token(request: Request) -> None:
    request.app.state.access.require_token(request)
