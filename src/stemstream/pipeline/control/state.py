"""Control's memory across a restart: the scans it runs, kept in a file ([pipeline] state_file).

Control is the one role every other asks about scans. If it dies mid-scan and comes back, the
others carry on meanwhile (they know the scan already) and must find it again as they left it:
same spec, same routing generation, the calibration histogram gathered so far. So control
rewrites this file (msgpack, written to a temporary name and renamed over the old one: a reader
sees the old state or the new, never half) after every request that changes a scan, before it
replies. The writer's commit ranges are not kept: a restarted control has a new ``instance``
in its heartbeat replies, and the writer reports all its commits again when it sees one.

A scan found running in a file older than ``scan_timeout_s`` is not revived: the writer has
closed it meanwhile (and tells control so when it can) or the whole session is gone. It is
listed as failed, with that reason, until the writer's report says otherwise.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import msgpack
import numpy as np

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Finished scans kept in the file (status and the dashboard list them after a restart); running
# scans are always kept.
FINISHED_KEPT = 20


class StateFileError(ValueError):
    """The state file cannot be read as control's state; the message is one sentence."""


def histogram_to_sparse(counts: np.ndarray) -> dict:
    """A pixel-value histogram (counts indexed by value + 65536) as its non-empty bins."""
    where = np.flatnonzero(counts)
    return {"bins": where.astype(np.int64).tolist(), "counts": counts[where].astype(np.int64).tolist()}


def histogram_from_sparse(sparse: dict, size: int) -> np.ndarray:
    counts = np.zeros(size, np.int64)
    bins = np.asarray(sparse.get("bins", []), np.int64)
    if bins.size and (bins.min() < 0 or bins.max() >= size):
        raise StateFileError("a calibration histogram bin lies outside the histogram")
    counts[bins] = np.asarray(sparse.get("counts", []), np.int64)
    return counts


def save_state(path: Path, state: dict) -> None:
    """Write ``state`` (msgpack-able) to ``path`` atomically."""
    data = msgpack.packb({"version": STATE_VERSION, "saved_at": time.time(), **state}, use_bin_type=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_state(path: Path) -> dict | None:
    """The state saved at ``path``; None when there is none. StateFileError when the file is not
    control's state (another program's file, torn by hand, a newer version)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"cannot read control's state file {path}: {exc.strerror or exc}") from None
    try:
        state = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        raise StateFileError(f"{path} is not a control state file (not msgpack)") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or not isinstance(state.get("scans"), dict):
        raise StateFileError(f"{path} is not a version {STATE_VERSION} control state file")
    return state


def set_aside(path: Path) -> Path:
    """Move an unreadable state file out of the way (kept for a look, not read again)."""
    aside = path.with_name(path.name + f".unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    return aside
