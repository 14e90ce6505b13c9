"""The dashboard's HTML pages and the files they link to.

``/`` (the live scan, node-group health, recent scans), ``/scans`` (the catalog), ``/scans/{id}``
(one scan: images, ledger, metadata), ``/scans/{id}/file`` (the download) and
``/scans/{id}/images/<analysis>/<result>`` (a PNG: the one beside the file, else rendered from
``/analysis`` in the file).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from stemstream.analysis.stored import image_label, image_order, stored_views, view_png
from stemstream.web.access import require_read
from stemstream.web.catalog import MAX_INTEGER, RECENT, catalog_row_json, image_links

log = logging.getLogger(__name__)

HERE = Path(__file__).parent


def _fmt_int(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


def _fmt_time(value: Any) -> str:
    return "-" if not value else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(value)))


templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescape on for .html
templates.env.filters["int"] = _fmt_int
templates.env.filters["when"] = _fmt_time
templates.env.globals["label"] = image_label

router = APIRouter()

#: A catalog id in a path, and an offset into the catalog: numbers the database can be asked about.
CatalogId = Annotated[int, PathParam(ge=0, le=MAX_INTEGER, description="a catalog id")]
Offset = Annotated[int, Query(ge=0, le=MAX_INTEGER)]


def catalog_entry(request: Request, entry: int) -> dict:
    """The catalog's row ``entry``; 404 when there is none (or it was deleted)."""
    row = request.app.state.catalog.get(entry)
    if row is None:
        raise HTTPException(404, f"there is no scan {entry} in the catalog")
    return row


@router.get("/", response_class=HTMLResponse)
def index(request: Request):
    require_read(request)
    catalog = request.app.state.catalog
    rows = [catalog_row_json(r) for r in catalog.list(RECENT)]
    return templates.TemplateResponse(request, "index.html", {
        "scans": rows, "count": catalog.count(), "control": request.app.state.config.network.control(),
        "catalog_url": catalog.shown_url})


@router.get("/scans", response_class=HTMLResponse)
def scans_page(request: Request, limit: int = 200, offset: Offset = 0):
    require_read(request)
    catalog = request.app.state.catalog
    limit = max(1, min(limit, 1000))
    rows = [catalog_row_json(r) for r in catalog.list(limit, offset)]
    return templates.TemplateResponse(request, "scans.html", {
        "scans": rows, "count": catalog.count(), "catalog_url": catalog.shown_url,
        "offset": offset, "limit": limit})


@router.get("/scans/{entry}", response_class=HTMLResponse)
def scan_page(request: Request, entry: CatalogId):
    require_read(request)
    row = catalog_row_json(catalog_entry(request, entry))
    path = Path(row["path"])
    if not row["images"] and path.is_file():  # no PNGs beside the file: what /analysis holds
        try:
            row["images"] = image_links(entry, image_order(list(stored_views(path))))
        except Exception as exc:
            log.info("no stored images in %s: %s", path, exc)
    return templates.TemplateResponse(request, "scan.html", {
        "scan": row, "file_exists": path.is_file(),
        "size": path.stat().st_size if path.is_file() else None})


@router.get("/scans/{entry}/file")
def download(request: Request, entry: CatalogId):
    require_read(request)
    path = Path(catalog_entry(request, entry)["path"])
    if not path.is_file():
        raise HTTPException(404, f"the file of scan {entry} is no longer at {path}")
    return FileResponse(path, filename=path.name, media_type="application/x-hdf5")


@router.get("/scans/{entry}/images/{key:path}")
def image(request: Request, entry: CatalogId, key: str):
    require_read(request)
    row = catalog_entry(request, entry)
    png = (row.get("images") or {}).get(key)
    headers = {"Cache-Control": "no-cache"}
    if png and Path(png).is_file():
        return FileResponse(png, media_type="image/png", headers=headers)
    path = Path(row["path"])
    if path.is_file():
        try:
            view = stored_views(path).get(key)
        except Exception:  # not a counted file (any more): no image, the 404 below
            view = None
        if view is not None:
            return Response(view_png(view), media_type="image/png", headers=headers)
    raise HTTPException(404, f"scan {entry} has no image {key!r}")


@router.get("/favicon.ico", include_in_schema=False)
def favicon():
    return Response(status_code=204)
