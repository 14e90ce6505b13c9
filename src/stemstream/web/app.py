"""The dashboard's web application (FastAPI): the routers of pages.py (HTML, images, downloads),
api.py (JSON) and push.py (WebSocket), the token and request guard of access.py, and the errors
they answer with.

Errors are JSON ``{"error": "...", "status": N}``, or an HTML page for a browser that asked for
one. The live monitor (live.py) runs as a background task for the application's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from stemstream.core.config import PipelineConfig
from stemstream.web import api, pages, push
from stemstream.web.access import Access, RequestGuard, error_response
from stemstream.web.catalog import Catalog
from stemstream.web.live import LiveMonitor


def _one_sentence(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return "the request body is not valid JSON"
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body",))
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "bad request: " + "; ".join(parts)


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/") and "text/html" in request.headers.get("accept", "")


async def _http_error(request: Request, exc: StarletteHTTPException):
    message = exc.detail if isinstance(exc.detail, str) else "error"
    if exc.status_code == 404 and message == "Not Found":
        message = f"there is no page {request.url.path}"
    if _wants_html(request):
        return pages.templates.TemplateResponse(request, "error.html", {"status": exc.status_code, "message": message},
                                                status_code=exc.status_code)
    return error_response(exc.status_code, message)


async def _bad_request(request: Request, exc: RequestValidationError):
    message = _one_sentence(exc)
    return error_response(400 if message.startswith("the request body is not valid JSON") else 422, message)


def _lifespan(config: PipelineConfig, catalog: Catalog, monitor: LiveMonitor, index_output: bool):
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

    return lifespan


def create_app(config: PipelineConfig, catalog: Catalog, token: str, *, open_reads: bool = True,
               exit_on_shutdown: bool = False, url: str = "", index_output: bool = True,
               monitor: LiveMonitor | None = None) -> FastAPI:
    """The dashboard for the pipeline of ``config``, its catalog in ``catalog``. ``token`` guards
    mutations (and reads unless ``open_reads``)."""
    access = Access(token, open_reads)
    monitor = monitor or LiveMonitor(config, catalog, exit_on_shutdown=exit_on_shutdown, url=url)
    app = FastAPI(title="stemstream dashboard", lifespan=_lifespan(config, catalog, monitor, index_output),
                  docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    app.state.access = access
    app.state.monitor = monitor
    app.state.catalog = catalog
    app.state.config = config
    app.mount("/static", StaticFiles(directory=str(pages.HERE / "static")), name="static")
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.middleware("http")(access.token_cookie)
    app.add_middleware(RequestGuard, access=access)  # added last: the outermost, before any body is read
    for module in (pages, api, push):
        app.include_router(module.router)
    return app
