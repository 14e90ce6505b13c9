"""The dashboard's web application (FastAPI): pages, JSON API, WebSocket, images and downloads.

Pages: ``/`` (the live scan, node-group health, recent scans), ``/scans`` (the catalog),
``/scans/{id}`` (one scan: images, ledger, metadata, download). API: ``GET /api/status``,
``GET /api/scans``, ``GET /api/scans/{id}``, ``POST /api/scans`` (start a scan; token),
``DELETE /api/scans/{id}`` (catalog entry only; token). WebSocket ``/ws`` pushes the live state.

Reads are open when the server listens on loopback only; on any other address they need the
token too (header, ``?token=`` once, then a cookie). Mutations always need it
(``Authorization: Bearer TOKEN`` or ``X-Stemstream-Token: TOKEN``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from stemstream.core.config import PipelineConfig
from stemstream.transport.control_client import ControlUnavailable
from stemstream.web.catalog import Catalog
from stemstream.web.live import LiveMonitor
from stemstream.analysis.stored import image_label, image_order, stored_views, view_png

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
TOKEN_COOKIE = "stemstream_token"


class StartScan(BaseModel):
    """Body of ``POST /api/scans``."""

    model_config = ConfigDict(extra="forbid")
    scan_shape: str | list[int] = Field(..., description="ROWSxCOLS, e.g. \"64x64\", or [rows, cols]")
    scan_number: int | None = Field(None, ge=0, le=2**31 - 1, description="default: one above the highest known")
    frames_per_position: int = Field(1, ge=1, le=1024)


def catalog_row_json(row: dict) -> dict:
    """A catalog row as the API and the page show it (image URLs instead of server paths)."""
    entry = row["id"]
    keys = image_order(row.get("images") or {})
    out = {k: v for k, v in row.items() if k != "images"}
    out["url"] = f"/scans/{entry}"
    out["file_url"] = f"/scans/{entry}/file"
    out["images"] = [{"key": k, "label": image_label(k), "url": f"/scans/{entry}/images/{k}"} for k in keys]
    out["thumbnail"] = out["images"][0]["url"] if out["images"] else None
    return out


def _fmt_int(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


def _fmt_time(value: Any) -> str:
    return "-" if not value else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(value)))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def _one_sentence(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return "the request body is not valid JSON"
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body",))
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "bad request: " + "; ".join(parts)


def create_app(config: PipelineConfig, catalog: Catalog, token: str, *, open_reads: bool = True,
               exit_on_shutdown: bool = False, url: str = "", index_output: bool = True,
               monitor: LiveMonitor | None = None) -> FastAPI:
    """The dashboard for the pipeline of ``config``, its catalog in ``catalog``. ``token`` guards
    mutations (and reads unless ``open_reads``)."""
    if not token:
        raise ValueError("the dashboard needs a token")
    monitor = monitor or LiveMonitor(config, catalog, exit_on_shutdown=exit_on_shutdown, url=url)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        indexing = None
        if index_output:  # in the background: a directory of thousands of files must not delay the page
            loop = asyncio.get_running_loop()
            indexing = loop.run_in_executor(None, catalog.index_directory, config.pipeline.output_dir)
        task = asyncio.create_task(monitor.run())
        try:
            yield
        finally:
            monitor.stopped = True
            if indexing is not None:
                indexing.cancel()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            monitor.close()

    app = FastAPI(title="stemstream dashboard", lifespan=lifespan, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.monitor = monitor
    app.state.catalog = catalog
    app.state.config = config
    templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescape on for .html
    templates.env.filters["int"] = _fmt_int
    templates.env.filters["when"] = _fmt_time
    templates.env.globals["label"] = image_label
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # -- access -----------------------------------------------------------------------------------

    def _header_token(request: Request | WebSocket) -> str:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return request.headers.get("x-stemstream-token") or ""

    def _given_token(request: Request | WebSocket) -> str:
        """For reads: a header, ``?token=`` or the cookie a link with the token left."""
        return _header_token(request) or request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""

    def _token_ok(given: str) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), token.encode())

    def require_token(request: Request) -> None:
        """Mutations take the token from a header only: a browser never adds one by itself, so
        another site cannot make a visitor's browser start or delete anything."""
        given = _header_token(request)
        if not given:
            raise HTTPException(401, "this request changes something: send the dashboard's token "
                                     "(Authorization: Bearer TOKEN)")
        if not _token_ok(given):
            raise HTTPException(403, "the token is wrong")

    def require_read(request: Request) -> None:
        if open_reads:
            return
        given = _given_token(request)
        if not given:
            raise HTTPException(401, "this dashboard listens beyond this machine: reading needs the token "
                                     "(open the address with ?token=TOKEN once)")
        if not _token_ok(given):
            raise HTTPException(403, "the token is wrong")

    def _wants_html(request: Request) -> bool:
        return not request.url.path.startswith("/api/") and "text/html" in request.headers.get("accept", "")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"there is no page {request.url.path}"
        if _wants_html(request):
            return templates.TemplateResponse(request, "error.html", {"status": exc.status_code, "message": message},
                                              status_code=exc.status_code)
        return _error(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        message = _one_sentence(exc)
        return _error(400 if message.startswith("the request body is not valid JSON") else 422, message)

    @app.middleware("http")
    async def token_cookie(request: Request, call_next):
        """``?token=`` on a page sets the cookie, so a link with the token works once and then the
        address bar no longer shows it."""
        given = request.query_params.get("token")
        if given and request.method == "GET" and not request.url.path.startswith("/api/") and _token_ok(given):
            response = RedirectResponse(request.url.remove_query_params("token"), status_code=303)
            response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict")
            return response
        return await call_next(request)

    # -- helpers ----------------------------------------------------------------------------------

    def _entry(entry: int) -> dict:
        row = catalog.get(entry)
        if row is None:
            raise HTTPException(404, f"there is no scan {entry} in the catalog")
        return row

    # -- pages ------------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request):
        require_read(request)
        rows = [catalog_row_json(r) for r in catalog.list(12)]
        return templates.TemplateResponse(request, "index.html", {
            "scans": rows, "count": catalog.count(), "control": config.network.control(),
            "catalog_url": catalog.shown_url})

    @app.get("/scans", response_class=HTMLResponse)
    def scans_page(request: Request, limit: int = 200, offset: int = 0):
        require_read(request)
        limit = max(1, min(limit, 1000))
        rows = [catalog_row_json(r) for r in catalog.list(limit, max(offset, 0))]
        return templates.TemplateResponse(request, "scans.html", {
            "scans": rows, "count": catalog.count(), "catalog_url": catalog.shown_url,
            "offset": offset, "limit": limit})

    @app.get("/scans/{entry}", response_class=HTMLResponse)
    def scan_page(request: Request, entry: int):
        require_read(request)
        row = catalog_row_json(_entry(entry))
        path = Path(row["path"])
        if not row["images"] and path.is_file():  # no PNGs beside the file: what /analysis holds
            try:
                keys = image_order(list(stored_views(path)))
                row["images"] = [{"key": k, "label": image_label(k), "url": f"/scans/{entry}/images/{k}"} for k in keys]
            except Exception as exc:
                log.info("no stored images in %s: %s", path, exc)
        return templates.TemplateResponse(request, "scan.html", {
            "scan": row, "file_exists": path.is_file(),
            "size": path.stat().st_size if path.is_file() else None})

    @app.get("/scans/{entry}/file")
    def download(request: Request, entry: int):
        require_read(request)
        row = _entry(entry)
        path = Path(row["path"])
        if not path.is_file():
            raise HTTPException(404, f"the file of scan {entry} is no longer at {path}")
        return FileResponse(path, filename=path.name, media_type="application/x-hdf5")

    @app.get("/scans/{entry}/images/{key:path}")
    def image(request: Request, entry: int, key: str):
        require_read(request)
        row = _entry(entry)
        png = (row.get("images") or {}).get(key)
        headers = {"Cache-Control": "no-cache"}
        if png and Path(png).is_file():
            return FileResponse(png, media_type="image/png", headers=headers)
        path = Path(row["path"])
        if path.is_file():
            try:
                view = stored_views(path).get(key)
            except Exception:
                view = None
            if view is not None:
                return Response(view_png(view), media_type="image/png", headers=headers)
        raise HTTPException(404, f"scan {entry} has no image {key!r}")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    # -- API --------------------------------------------------------------------------------------

    @app.get("/api/status")
    async def api_status(request: Request):
        require_read(request)
        state = monitor.state_text or monitor.build_state()
        return Response(state, media_type="application/json")

    @app.get("/api/scans")
    def api_scans(request: Request, limit: int = 50, offset: int = 0, scan_number: int | None = None):
        require_read(request)
        if not 1 <= limit <= 1000 or offset < 0:
            raise HTTPException(422, "limit must be 1 to 1000 and offset at least 0")
        rows = catalog.list(limit, offset, scan_number)
        return {"count": catalog.count(), "scans": [catalog_row_json(r) for r in rows]}

    @app.get("/api/scans/{entry}")
    def api_scan(request: Request, entry: int):
        require_read(request)
        return catalog_row_json(_entry(entry))

    @app.delete("/api/scans/{entry}")
    def api_delete(request: Request, entry: int):
        require_token(request)
        if not catalog.hide(entry):
            raise HTTPException(404, f"there is no scan {entry} in the catalog")
        return {"deleted": entry, "note": "the catalog entry is gone; the file was not touched"}

    @app.post("/api/scans", status_code=202)
    async def api_start(request: Request, body: StartScan):
        require_token(request)
        from stemstream.cli.support import UserError, parse_shape

        try:
            if isinstance(body.scan_shape, str):
                shape = parse_shape(body.scan_shape, "scan_shape")
            else:
                if len(body.scan_shape) != 2:
                    raise UserError("scan_shape must be [rows, cols]")
                shape = parse_shape(f"{body.scan_shape[0]}x{body.scan_shape[1]}", "scan_shape")
        except UserError as exc:
            raise HTTPException(422, str(exc)) from None
        number = body.scan_number
        if number is None:
            known = [int(n) for n in monitor.status.get("scans", {})]
            number = max([catalog.max_scan_number(), *known]) + 1
        try:
            reply = await monitor.request("start_scan", scan_number=number, scan_shape=list(shape),
                                          frames_per_position=body.frames_per_position)
        except ControlUnavailable as exc:
            raise HTTPException(503, f"the pipeline's control is not reachable: {exc}") from None
        if not reply.get("ok"):
            raise HTTPException(409, str(reply.get("error", "control refused the scan")))
        spec = reply["scan"]
        return {"scan": spec["scan"], "file_name": spec["file_name"], "scan_shape": spec["scan_shape"],
                "frames_per_position": spec["frames_per_position"], "epoch": spec["epoch"]}

    # -- push -------------------------------------------------------------------------------------

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        if not open_reads and not _token_ok(_given_token(websocket)):
            await websocket.close(code=1008)
            return
        await websocket.accept()
        from stemstream.web.live import Client

        client = Client()
        for text in monitor.greeting():
            client.offer(text)
        monitor.clients.add(client)

        async def drain() -> None:  # notices a browser that went away
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                while True:
                    await websocket.receive_text()

        reader = asyncio.create_task(drain())
        try:
            while not reader.done():
                getter = asyncio.create_task(client.queue.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                await websocket.send_text(getter.result())
                client.sent += 1
        except (WebSocketDisconnect, RuntimeError, ConnectionError):
            pass
        finally:
            monitor.clients.discard(client)
            reader.cancel()

    return app
