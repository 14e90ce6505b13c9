"""The dashboard's JSON API.

``GET /api/status`` (what the live page gets), ``GET /api/scans``, ``GET /api/scans/{id}``,
``POST /api/scans`` (start a scan), ``DELETE /api/scans/{id}`` (the catalog entry only). The two
that change something need the token (access.RequestGuard checks it before their body is read).
Errors are ``{"error": "...", "status": N}`` (see app.py).
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from stemstream.core.scan_spec import ScanSpec, SpecError, parse_scan_shape
from stemstream.transport.control_client import ControlUnavailable
from stemstream.web.access import require_read
from stemstream.web.catalog import MAX_INTEGER, catalog_row_json
from stemstream.web.pages import CatalogId, Offset, catalog_entry

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api")


class StartScan(BaseModel):
    """Body of ``POST /api/scans``."""

    model_config = ConfigDict(extra="forbid")
    scan_shape: str | list[int] = Field(..., description="ROWSxCOLS, e.g. \"64x64\", or [rows, cols]")
    scan_number: int | None = Field(None, ge=0, le=2**31 - 1, description="default: one above the highest known")
    frames_per_position: int = Field(1, ge=1, le=1024)


def _scan_shape(value: str | list[int]) -> tuple[int, int]:
    """(rows, cols) of ``"ROWSxCOLS"`` or ``[rows, cols]``; 422 with one sentence otherwise."""
    try:
        if isinstance(value, str):
            return parse_scan_shape(value, "scan_shape")
        if len(value) != 2:
            raise SpecError("scan_shape must be [rows, cols]")
        return parse_scan_shape(f"{value[0]}x{value[1]}", "scan_shape")  # the same words as for text
    except SpecError as exc:
        raise HTTPException(422, str(exc)) from None


@router.get("/status")
async def api_status(request: Request):
    require_read(request)
    monitor = request.app.state.monitor
    return Response(monitor.state_text or monitor.build_state(), media_type="application/json")


@router.get("/scans")
def api_scans(request: Request, limit: int = 50, offset: Offset = 0,
              scan_number: Annotated[int | None, Query(ge=0, le=MAX_INTEGER)] = None):
    require_read(request)
    if not 1 <= limit <= 1000:
        raise HTTPException(422, "limit must be 1 to 1000")
    catalog = request.app.state.catalog
    rows = catalog.list(limit, offset, scan_number)
    return {"count": catalog.count(), "scans": [catalog_row_json(r) for r in rows]}


@router.get("/scans/{entry}")
def api_scan(request: Request, entry: CatalogId):
    require_read(request)
    return catalog_row_json(catalog_entry(request, entry))


@router.delete("/scans/{entry}")
def api_delete(request: Request, entry: CatalogId):
    if not request.app.state.catalog.hide(entry):
        raise HTTPException(404, f"there is no scan {entry} in the catalog")
    return {"deleted": entry, "note": "the catalog entry is gone; the file was not touched"}


@router.post("/scans", status_code=202)
async def api_start(request: Request, body: StartScan):
    shape = _scan_shape(body.scan_shape)
    monitor = request.app.state.monitor
    number = body.scan_number
    if number is None:
        number = max([request.app.state.catalog.max_scan_number(), *monitor.scans]) + 1
    try:
        reply = await monitor.request("start_scan", scan_number=number, scan_shape=list(shape),
                                      frames_per_position=body.frames_per_position)
    except ControlUnavailable as exc:
        raise HTTPException(503, f"the pipeline's control is not reachable: {exc}") from None
    if not reply.get("ok"):
        raise HTTPException(409, str(reply.get("error", "control refused the scan")))
    try:
        spec = ScanSpec.from_wire(reply.get("scan"))
    except SpecError as exc:  # started, but its spec unreadable: a control of another version
        log.debug("control's reply to start_scan: %s", exc)
        raise HTTPException(502, f"control started scan {number} but its reply is unreadable: {exc}") from None
    return {"scan": spec.number, "file_name": spec.file_name, "scan_shape": list(spec.shape),
            "frames_per_position": spec.frames_per_position, "epoch": spec.epoch}
