"""The fields of a request to control, checked before control acts on any of them.

Every request has a schema (:data:`SCHEMAS`): the checks of each of its fields, and whether it
only reads (every other request needs an authenticated sender: transport.session_token). Control
checks a request against its schema at the edge, before any handler runs, so a malformed request
gets a one-sentence refusal and changes nothing; the handlers read the fields through the same
checks. Types are checked exactly (no ``int()`` of what came): a float such as 1e300 or inf made
into an integer would be too big for msgpack, and the scan or role holding it would break every
later reply and the state file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from stemstream.core.detector import MAX_FRAME_NUMBER, MAX_NODE_ID, MAX_SCAN_NUMBER, N_MODULES
from stemstream.core.scan_spec import MAX_INSTANCE_CHARS, SpecError, check_scan_shape

# Role names are a short word ("node", "writer", "dashboard"); a host is a name or an address.
_ROLE = re.compile(r"^[a-z][a-z_]{0,31}$")
_HOST = re.compile(r"^[A-Za-z0-9._:%\[\]-]{1,253}$")
# The writer adds suffixes (.tmp, .journal) to a file name; most file systems allow 255 bytes.
MAX_FILE_NAME = 200
_MISSING = object()
# A node group's calibration histogram: counts of one pixel value over a sample of about a
# thousand frames stay far below this, and the sum of every bin of every node group stays an int64.
MAX_BIN_COUNT = 2**40


class RequestError(ValueError):
    """A request control refuses; the message is one sentence naming the field."""


def _shown(value) -> str:
    return f"{value!r:.40}"


def _get(req: dict, name: str, default):
    value = req.get(name, default)
    if value is _MISSING:
        raise RequestError(f"the request has no {name}")
    return value


def integer(req: dict, name: str, low: int = 0, high: int = 2**63 - 1, default=_MISSING) -> int:
    """``req[name]``, an integer ``low`` to ``high`` (``default`` when absent, if given)."""
    return _integer(_get(req, name, default), name, low, high)


def _integer(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{name} must be an integer {low} to {high}, got {_shown(value)}")
    return value


def scan_number(req: dict, name: str = "scan") -> int:
    return integer(req, name, 0, MAX_SCAN_NUMBER)


def number(value, name: str) -> float:
    """A finite number (integer or float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {_shown(value)}")
    return float(value)


def flag(req: dict, name: str, default: bool) -> bool:
    value = req.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {_shown(value)}")
    return value


def mapping(req: dict, name: str, default=_MISSING) -> dict:
    value = _get(req, name, default)
    if not isinstance(value, dict):
        raise RequestError(f"{name} must be a map, got {_shown(value)}")
    return value


def optional_mapping(req: dict, name: str) -> dict | None:
    return None if req.get(name) is None else mapping(req, name)


def role(req: dict) -> tuple[str, int]:
    """(role name, id) of a heartbeat or leave; ids travel as uint16 like node-group ids."""
    name = _get(req, "role", _MISSING)
    if not isinstance(name, str) or not _ROLE.match(name):
        raise RequestError(f"role must be a role's name (a short lower-case word), got {_shown(name)}")
    return name, integer(req, "id", 0, MAX_NODE_ID, default=0)


def host(req: dict, default: str) -> str:
    """The host a node group listens on; ``default`` when it did not say."""
    value = req.get("host") or default
    if not isinstance(value, str) or not _HOST.match(value):
        raise RequestError(f"host must be a host name or address, got {_shown(value)}")
    return value


def scan_shape(req: dict) -> tuple[int, int]:
    """``scan_shape`` as (rows, cols)."""
    shape = _get(req, "scan_shape", _MISSING)
    if not isinstance(shape, list) or len(shape) != 2:
        raise RequestError(f"scan_shape must be [rows, cols], got {_shown(shape)}")
    rows, cols = (_integer(v, "scan_shape", -(2**63), 2**63 - 1) for v in shape)  # check_scan_shape says what fits
    try:
        return check_scan_shape(rows, cols)
    except SpecError as exc:
        raise RequestError(str(exc)) from None


def node_ids(value, name: str, highest: int) -> list[int]:
    """A list of node-group ids 0 to ``highest``, sorted, each once."""
    if not isinstance(value, list):
        raise RequestError(f"{name} must be a list of node group ids, got {_shown(value)}")
    return sorted({_integer(n, f"{name} (node group ids)", 0, highest) for n in value})


def block_ranges(req: dict, n_blocks: int) -> list[list[int]]:
    """``ranges``: sorted, disjoint half-open ranges of a scan's block numbers (0 to n_blocks)."""
    ranges = _get(req, "ranges", _MISSING)
    if not isinstance(ranges, list) or not all(isinstance(r, list) and len(r) == 2 for r in ranges):
        raise RequestError(f"ranges must be a list of [start, stop] pairs, got {_shown(ranges)}")
    checked = [[_integer(a, "ranges", 0, n_blocks), _integer(b, "ranges", 0, n_blocks)] for a, b in ranges]
    stops = [0] + [b for _, b in checked]
    if any(a < before or b <= a for (a, b), before in zip(checked, stops)):
        raise RequestError("ranges must be sorted, disjoint and not empty")
    return checked


def file_name(req: dict) -> str | None:
    """The output file's name (None: control names it); a bare name, never a path."""
    name = req.get("file_name")
    if name is None or name == "":
        return None
    if (not isinstance(name, str) or len(name) > MAX_FILE_NAME or name in (".", "..")
            or any(c in name for c in "/\\\0")):
        raise RequestError(f"file_name must be a file's name (no directory, at most {MAX_FILE_NAME} "
                           f"characters), got {_shown(name)}")
    return name


def frames_per_position(req: dict) -> int:
    return integer(req, "frames_per_position", 1, default=1)


def resume(req: dict) -> bool:
    return flag(req, "resume", False)


def thresholds(req: dict) -> tuple[float, float] | None:
    """(background, xray) a ``start_scan`` fixes, in ADU; None when it fixes none."""
    given = optional_mapping(req, "thresholds")
    if given is None:
        return None
    return number(given.get("background"), "thresholds.background"), number(given.get("xray"), "thresholds.xray")


def fenced(req: dict) -> int:
    """The routing generation the writer has fenced."""
    return integer(req, "fenced")


def done_nodes(req: dict) -> list[int]:
    """The node groups done in the fenced generation."""
    return node_ids(req.get("done", []), "done", MAX_NODE_ID)


def gateway_id(req: dict) -> int:
    return integer(req, "id", 0, MAX_NODE_ID, default=0)


def node(req: dict) -> int:
    """The node group a calibration histogram comes from."""
    return integer(req, "node", 0, MAX_NODE_ID)


def scan_ok(req: dict) -> bool:
    """Whether the writer closed the scan (false: it failed)."""
    return flag(req, "ok", True)


def module(req: dict) -> int:
    """A detector module (a producer's)."""
    return integer(req, "module", 0, N_MODULES - 1)


def summary(req: dict) -> dict | None:
    return optional_mapping(req, "summary")


def histogram(req: dict) -> None:
    """A calibration request's histogram: ``values`` (pixel values) and ``counts`` (how many
    pixels had each), lists of integers of one length, and ``n_frames``, the frames sampled. The
    pixel-value range is the histogram's own check (counting.thresholds.PixelHistogram), the
    sample's size control's (pipeline.control.scans)."""
    values, counts, n_frames = req.get("values", []), req.get("counts", []), req.get("n_frames", 0)
    if not isinstance(values, list) or not isinstance(counts, list) or len(values) != len(counts):
        raise RequestError("a calibration histogram's values and counts must be lists of one length")
    try:
        for v in values:
            _integer(v, "values", -(2**31), 2**31)
        for c in counts:
            _integer(c, "counts", 0, MAX_BIN_COUNT)
        _integer(n_frames, "n_frames", 0, 2**63 - 1)
    except RequestError:
        raise RequestError("a calibration histogram holds something other than integers in range") from None


# -- one schema per request ----------------------------------------------------------------------


@dataclass(frozen=True)
class Schema:
    """What a request must hold (each check raises RequestError), and whether it only reads."""

    checks: tuple[Callable[[dict], object], ...] = ()
    reads_only: bool = False


def _optional_host(req: dict) -> None:
    if req.get("host"):  # none or "": control's configured host
        host(req, "")


def _optional_instance(req: dict) -> None:
    """A role's incarnation (core.scan_spec: a short token), when it gives one."""
    value = req.get("instance")
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= MAX_INSTANCE_CHARS):
        raise RequestError(f"instance must be a token of 1 to {MAX_INSTANCE_CHARS} characters, got {_shown(value)}")


def _requested_nodes(req: dict) -> None:
    if req.get("nodes") is not None:
        node_ids(req["nodes"], "nodes", MAX_NODE_ID)  # control narrows it to the ports it has


SCHEMAS: dict[str, Schema] = {
    "status": Schema(reads_only=True),
    "get_scan": Schema((scan_number,), reads_only=True),
    "heartbeat": Schema((role, lambda r: mapping(r, "stats", {}), _optional_host, _optional_instance)),
    "leave": Schema((role,)),
    "start_scan": Schema((lambda r: scan_number(r, "scan_number"), scan_shape, frames_per_position, _requested_nodes,
                          file_name, resume, thresholds)),
    # the ranges' bound here is any scan's; control checks them against the scan's own blocks
    "committed": Schema((scan_number, lambda r: block_ranges(r, MAX_FRAME_NUMBER + 1), fenced, done_nodes)),
    "writer_restarted": Schema((scan_number,)),
    "gateway_restarted": Schema((gateway_id,)),
    "calibration": Schema((scan_number, node, histogram)),
    "scan_done": Schema((scan_number, scan_ok, summary)),
    "missed_blocks": Schema((module,), reads_only=True),
    "shutdown": Schema(),
}


def check(req: dict) -> str:
    """The request's op, once every field its schema names passed its check; RequestError
    (one sentence) for an unknown op or the first field that did not."""
    op = req.get("op")
    schema = SCHEMAS.get(op) if isinstance(op, str) else None
    if schema is None:
        raise RequestError(f"unknown request {op!r:.40}")
    for field_check in schema.checks:
        field_check(req)
    return op


def reads_only(op) -> bool:
    """True for the requests anyone who reaches control may make (they change nothing)."""
    schema = SCHEMAS.get(op) if isinstance(op, str) else None
    return schema is not None and schema.reads_only
