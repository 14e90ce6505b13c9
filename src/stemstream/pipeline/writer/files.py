"""The names a scan's counted file may have in the output directory, and what a file already there
means for a writer about to open the scan.

A scan closed with every frame is at its spec's ``file_name``; one closed with frames missing (a
stop, a dead node group nobody replaced) at ``<stem>.incomplete.h5``, so nobody mistakes it for a
whole scan; ``stemstream replay`` completes it into the full name. A file that is already there
is never replaced, except by the resume of that scan (a replay): a writer restarted after its
predecessor renamed the finished file (but died before reporting it) takes that file as the
scan's result instead of writing an empty one over it.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from stemstream.core.scan_spec import ScanSpec
from stemstream.formats.sparse_h5 import read_counted
from stemstream.formats.sparse_h5.layout import SUBPIXEL_POSITIONS
from stemstream.formats.sparse_h5.metadata import read_metadata
from stemstream.pipeline.writer.incomplete import SetAside

INCOMPLETE_SUFFIX = ".incomplete.h5"


def incomplete_path(path: Path) -> Path:
    """``FOURD_..._00001.h5`` -> ``FOURD_..._00001.incomplete.h5``."""
    return path.with_name(path.stem + INCOMPLETE_SUFFIX)


def whole_name(name: str) -> str:
    """``NAME.incomplete.h5`` -> ``NAME.h5``; any other name as it is."""
    return name[:-len(INCOMPLETE_SUFFIX)] + ".h5" if name.endswith(INCOMPLETE_SUFFIX) else name


def scan_paths(output_dir: Path, spec: ScanSpec) -> tuple[Path, Path]:
    """(whole, incomplete): the two names ``spec``'s file may have (a spec naming the incomplete
    file, as a resume of it may, means the same two)."""
    path = Path(output_dir) / whole_name(spec.file_name)
    return path, incomplete_path(path)


def existing_file(output_dir: Path, spec: ScanSpec) -> Path | None:
    """The file of ``spec``'s name already in the output directory (whole or incomplete), if any."""
    for path in scan_paths(output_dir, spec):
        if path.exists():
            return path
    return None


def stemstream_metadata(path: Path) -> dict:
    """``/metadata/stemstream`` of a counted file, without reading its events ({} if none or
    unreadable: such a file is not one this writer finished)."""
    try:
        with h5py.File(path, "r") as f:
            group = f.get("metadata/stemstream")
            return read_metadata(group) if isinstance(group, h5py.Group) else {}
    except (OSError, ValueError):
        return {}


def _plain(value):
    """A value read back from HDF5 as msgpack packs it: arrays as lists, numpy numbers as Python
    numbers, maps (a ledger's ``failovers``, ``rejected_reasons``) all the way down."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value.tolist() if hasattr(value, "tolist") else value


def finished_summary(path: Path, spec: ScanSpec) -> dict | None:
    """The summary of ``path`` if a writer finished it for this very run of the scan (same scan
    number and epoch); None if it is another scan's or another run's file."""
    return run_summary(path, spec.number, spec.epoch)


def run_summary(path: Path, number: int, epoch: int) -> dict | None:
    """:func:`finished_summary` for the run ``epoch`` of scan ``number``."""
    meta = stemstream_metadata(path)
    if meta.get("scan_number") != number or meta.get("epoch") != epoch:
        return None
    # the file's masks of written and incomplete frames stay in the file: a summary travels in control's messages
    # (as plain numbers and lists: HDF5 gives numpy values, msgpack packs neither)
    in_file_only = ("written", "incomplete", "incomplete_frames")
    ledger = {k: _plain(v) for k, v in meta.get("ledger", {}).items() if k not in in_file_only}
    seconds = float(meta.get("seconds", 0.0))
    received = int(ledger.get("frames_received", 0))
    return {"scan": number, "path": str(path), "ledger": ledger, "events": int(meta.get("events", 0)),
            "seconds": seconds, "frames_per_second": received / seconds if seconds > 0 else 0.0,
            "thresholds": None, "images": [], "recovered": True}


def subpixel_of(path: Path) -> np.ndarray | None:
    """A counted file's sub-pixel positions (formats.sparse_h5.layout.SUBPIXEL_POSITIONS), a
    (k, 2) float32 array per slot in slot order; None when the file has none."""
    with h5py.File(path, "r") as f:
        found = f.get(SUBPIXEL_POSITIONS)
        if not isinstance(found, h5py.Dataset):
            return None
        out = np.empty(found.shape[0], object)
        for i, points in enumerate(found[()]):  # one by one: an object array of arrays, whatever their lengths
            out[i] = np.asarray(points, np.float32).reshape(-1, 2)
        return out


def frames_to_resume(path: Path, frames_per_position: int) -> tuple[dict, np.ndarray, list, list | None, SetAside]:
    """What a resume (a replay) carries over of the file at ``path``: (its
    ``/metadata/stemstream``, the slots written, their events, their sub-pixel positions (None:
    the file has none), the incomplete frames set aside). Set aside when the file's ledger names
    them (pipeline.writer.incomplete): a frame the replay brings whole takes the place of such a
    frame (pipeline.writer.scan)."""
    old = read_counted(path)
    earlier = old.metadata.get("stemstream", {})
    ledger = earlier.get("ledger", {})
    frames = old.frames.reshape(-1)
    points = subpixel_of(path)
    points = points if points is not None and len(points) == len(frames) else None
    written = old.written
    mask = written.reshape(-1) if written is not None else np.ones(len(frames), bool)
    flags, numbers = ledger.get("incomplete"), ledger.get("incomplete_frames")
    aside = SetAside()
    if flags is not None and np.size(flags) == len(frames):
        flagged = np.flatnonzero(np.asarray(flags, bool).reshape(-1))
        held = mask[flagged]  # (a flagged slot is a written one)
        numbers = None if numbers is None else np.asarray(numbers, np.int64).reshape(-1)
        numbers = numbers[held] if numbers is not None and len(numbers) == len(flagged) else None
        if frames_per_position == 1 or numbers is not None:  # one frame per position: its position names it
            aside = SetAside(flagged[held], [frames[i] for i in flagged[held]], numbers, frames_per_position == 1,
                             None if points is None else list(points[flagged[held]]))
        mask[aside.slots()] = False
    slots = np.flatnonzero(mask)
    return earlier, slots, [frames[i] for i in slots], None if points is None else list(points[slots]), aside
