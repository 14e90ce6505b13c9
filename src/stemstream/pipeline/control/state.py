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

from stemstream.core.scan_spec import ScanSpec
from stemstream.counting.thresholds import PixelHistogram
from stemstream.pipeline.control.scans import ScanState

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: specs as core.scan_spec wire maps, histograms as PixelHistogram.to_wire()
# Finished scans kept in the file (status and the dashboard list them after a restart); running
# scans are always kept.
FINISHED_KEPT = 20
_STATES = ("running", "closed", "failed")


class StateFileError(ValueError):
    """The state file cannot be read as control's state; the message is one sentence."""


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


class StateFile:
    """Control's scans in ``path``: read once at control's start, rewritten after each change."""

    def __init__(self, path: Path):
        self.path = path
        self._failing = False  # the last write failed (said once, not at every change)

    def load(self, scan_timeout_s: float) -> tuple[dict[int, ScanState], int]:
        """(scans by number, the file sequence number) saved; none when there is no file. A file
        that cannot be read is moved aside (one log line) and control starts with no scans."""
        try:
            saved = load_state(self.path)
        except StateFileError as exc:
            self._set_aside(str(exc))
            return {}, 0
        if saved is None:
            return {}, 0
        fresh = time.time() - float(saved.get("saved_at", 0)) <= scan_timeout_s
        try:
            scans = {int(number): _scan_from_saved(kept, fresh) for number, kept in saved["scans"].items()}
            sequence = int(saved.get("sequence", 0))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            self._set_aside(f"{self.path} holds a scan control cannot read ({exc})")
            return {}, 0
        running = [n for n, s in scans.items() if s.running]
        log.warning("control restarted: %d scan(s) from %s, running: %s", len(scans), self.path, running or "none")
        return scans, sequence

    def _set_aside(self, problem: str) -> None:
        """Keep the unreadable state file for a look, out of the way."""
        try:
            where = f"moved to {set_aside(self.path).name}"
        except OSError as exc:
            where = f"could not move it aside ({exc.strerror or exc}), it will be overwritten"
        log.error("%s; %s, starting with no scans", problem, where)

    def save(self, scans: dict[int, ScanState], sequence: int) -> None:
        """Write the running scans and the latest FINISHED_KEPT finished ones; a failure is logged
        (control goes on; only a restart would lose the scans)."""
        finished = sorted((n for n, s in scans.items() if not s.running), key=lambda n: scans[n].started)
        keep = [n for n, s in scans.items() if s.running] + finished[-FINISHED_KEPT:]
        try:
            save_state(self.path, {"sequence": sequence, "scans": {n: _saved_scan(scans[n]) for n in keep}})
        except OSError as exc:
            if not self._failing:
                log.error("cannot write control's state file %s: %s; a restarted control will not have "
                          "the scans", self.path, exc.strerror or exc)
            self._failing = True
        else:
            if self._failing:
                log.info("control's state file %s written again", self.path)
            self._failing = False


def _saved_scan(scan: ScanState) -> dict:
    histogram = scan.histogram.to_wire() if scan.running and scan.histogram is not None else {}
    return {"spec": scan.spec.to_wire(), "started": scan.started, "state": scan.state, "summary": scan.summary,
            "contributors": sorted(scan.contributors), "done_nodes": sorted(scan.done_nodes), "histogram": histogram}


def _scan_from_saved(kept: dict, fresh: bool) -> ScanState:
    """A saved scan; one found running in a file older than scan_timeout_s (not ``fresh``) is
    listed failed. KeyError, TypeError or ValueError for a map that is not one."""
    if kept["state"] not in _STATES:
        raise ValueError(f"unknown scan state {kept['state']!r}")
    scan = ScanState(spec=ScanSpec.from_wire(kept["spec"]), started=float(kept["started"]), state=kept["state"],
                     summary=kept.get("summary"), contributors={int(n) for n in kept.get("contributors", [])},
                     done_nodes={int(n) for n in kept.get("done_nodes", [])})
    if scan.running:
        scan.histogram = PixelHistogram.from_wire(kept.get("histogram") or {})
        if not fresh:
            scan.fail("control was down longer than [flow] scan_timeout_s while the scan ran")
    return scan
