"""The writer's journal: every committed block's events, appended before the commit is reported.

A writer killed mid-scan loses its open HDF5 file (HDF5 is not safe against a process dying in
a write), and the producers have already freed the blocks it reported committed. The journal
keeps exactly those: one record per committed EVENTS message, made durable (flushed and
fsync'ed, so it outlives the process and the machine) before the commit goes to control. A
record appended but not yet synced belongs to a commit nobody has heard of: its block is still
in the producers' buffers and will be resent, so losing it loses nothing. A restarted writer reads it back, rewrites the file from it,
and asks control for a new routing generation, so that everything else is streamed again.

Layout: records of an 8-byte little-endian length and a msgpack map. The first record names the
scan and its epoch (a resumed scan is another epoch) and holds what ``stemstream recover`` needs
to rebuild the file once no writer will (pipeline.writer.recover): the scan's spec
(``ScanSpec.to_wire``) and whether the file keeps sub-pixel positions. A torn last record is
ignored. A message's sub-pixel positions (the cluster method's), when it had them, are in its
record's ``subpixel``, and how it was counted (method and model) in its ``counting``.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np

from stemstream.core.scan_spec import ScanSpec
from stemstream.formats import wire

log = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".journal"
_LENGTH = struct.Struct("<Q")
_FIELDS = (("frame_numbers", np.uint32), ("positions", np.int64), ("present", np.uint8), ("offsets", np.int64),
           ("events", np.uint32))


def journal_path(h5_path: Path) -> Path:
    return h5_path.with_name(h5_path.name + JOURNAL_SUFFIX)


class JournalError(ValueError):
    """A journal that cannot be read as a whole; the message is one sentence."""


class Journal:
    """Append-only record of one scan's committed events. ``header``: more of the first record
    (what recovery needs, :meth:`for_scan`)."""

    def __init__(self, path: Path, scan: int, epoch: int, header: dict | None = None):
        self.path = path
        self._file = open(path, "ab")
        self._thresholds = None  # those of the newest spec journaled (see add)
        if self._file.tell() == 0:
            self._append({**(header or {}), "scan": scan, "epoch": epoch})

    @classmethod
    def for_scan(cls, path: Path, spec: ScanSpec, subpixel_positions: bool) -> Journal:
        """The journal of a writer's scan of ``spec``, its first record holding what a later
        ``stemstream recover`` needs to rebuild the file as that writer would."""
        journal = cls(path, spec.number, spec.epoch, {"spec": spec.to_wire(), "subpixel_positions": subpixel_positions})
        journal._thresholds = spec.thresholds
        return journal

    def _append(self, record: dict) -> None:
        data = msgpack.packb(record, use_bin_type=True)
        self._file.write(_LENGTH.pack(len(data)))
        self._file.write(data)

    def add(self, msg: wire.EventsMessage, spec: ScanSpec | None = None) -> None:
        """Journal a committed block's events; and before them ``spec`` (control's newest of the
        scan) when its thresholds are not those journaled yet: calibrated thresholds come after
        the scan starts, and a recovered file names the thresholds its frames were counted with."""
        if spec is not None and spec.thresholds is not None and spec.thresholds != self._thresholds:
            self._append({"spec": spec.to_wire()})
            self._thresholds = spec.thresholds
        record = {"block": msg.block, "node": msg.node, "stream": msg.stream, "ledger": msg.ledger}
        if msg.counting is not None:  # (the writer's file names the model of every frame: pipeline.writer.counting)
            record["counting"] = msg.counting
        for name, dtype in _FIELDS:  # msgpack packs the arrays' memory as it is, without a copy first
            record[name] = memoryview(np.ascontiguousarray(getattr(msg, name), dtype)).cast("B")
        if msg.subpixel is not None:  # (the cluster method's: the file keeps them too)
            # flat: a memoryview of (0, 2) cannot be cast, and a block of dark frames has no event
            record["subpixel"] = memoryview(np.ascontiguousarray(msg.subpixel, np.float32).reshape(-1)).cast("B")
        self._append(record)

    def sync(self) -> None:
        """Everything added so far on stable storage (called before each commit report, at most
        every 0.1 s, so the cost is one fsync per report, not one per block)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self, delete: bool = True) -> threading.Thread | None:
        """Close the journal; with ``delete``, remove it in a thread of its own and return that
        thread. Unlinking the journal of a 1024 x 1024 scan (2.5 GB) took 2.3 s here, between the
        last frame and the file reported closed; the file in place holds everything by then, and a
        writer that dies before the unlink leaves a journal its successor removes
        (pipeline.writer.role: a finished file wins over a journal). Not a daemon thread: the
        process does not exit before the unlink is done."""
        self._file.close()
        if not delete:
            return None
        remover = threading.Thread(target=self.path.unlink, kwargs={"missing_ok": True}, name="journal-unlink")
        remover.start()
        return remover


def _records(path: Path, strict: bool = False) -> Iterator[dict]:
    """The records of ``path``; a torn last record is ignored (a warning, unless ``strict``: a
    check before the reading that says it). An unreadable record ends the journal there (a
    warning), or with ``strict`` raises JournalError."""
    data = path.read_bytes()
    at = 0
    while at + _LENGTH.size <= len(data):
        (length,) = _LENGTH.unpack_from(data, at)
        if at + _LENGTH.size + length > len(data):
            if not strict:
                log.warning("%s: torn last record ignored (the writer died while appending it)", path)
            return
        try:
            record = msgpack.unpackb(data[at + _LENGTH.size: at + _LENGTH.size + length], raw=False)
            if not isinstance(record, dict):
                raise ValueError("not a map")
        except Exception:
            if strict:
                raise JournalError(f"{path} is corrupt: its record at byte {at} is unreadable") from None
            log.warning("%s: unreadable record at byte %d; the rest is ignored", path, at)
            return
        yield record
        at += _LENGTH.size + length


def _message(scan: int, r: dict) -> wire.EventsMessage:
    arrays = {name: np.frombuffer(r[name], dtype) for name, dtype in _FIELDS}
    subpixel = np.frombuffer(r["subpixel"], np.float32).reshape(-1, 2) if "subpixel" in r else None
    counting = wire.counting_field(r)  # (checked as a message's: a journal is read back as the messages were)
    return wire.EventsMessage(scan, int(r["node"]), block=int(r["block"]), stream=int(r.get("stream", 0)),
                              ledger=r.get("ledger"), subpixel=subpixel, counting=counting, **arrays)


def check_journal(path: Path) -> tuple[dict, int]:
    """(the first record of ``path``, the frames of every committed block in it), a torn last
    record ignored. The first record names scan and epoch and, from writers that record it, holds
    ``spec`` (here the newest journaled: see Journal.add) and ``subpixel_positions``.
    JournalError, as one sentence, when the journal has no whole record, or a record is
    unreadable or not a block's events."""
    frames = 0
    records = _records(path, strict=True)
    header = next(records, None)
    if header is None:
        raise JournalError(f"{path} holds no whole record (its writer died as it created it): nothing to recover")
    for r in records:
        if _is_spec(r):
            header = {**header, "spec": r["spec"]}
            continue
        try:
            msg = _message(0, r)
        except (KeyError, TypeError, ValueError) as exc:
            raise JournalError(f"{path} is corrupt: a record is not a block's events ({type(exc).__name__})") from None
        n, offsets = len(msg.frame_numbers), msg.offsets
        if not (len(msg.positions) == len(msg.present) == n and len(offsets) == n + 1 and offsets[0] == 0
                and offsets[-1] == len(msg.events) and (np.diff(offsets) >= 0).all()
                and (msg.subpixel is None or len(msg.subpixel) == len(msg.events))):
            raise JournalError(f"{path} is corrupt: the arrays of block {msg.block}'s record do not agree")
        frames += n
    return header, frames


def read_journal(path: Path, scan: int, epoch: int) -> list[wire.EventsMessage] | None:
    """The committed events of (scan, epoch) in ``path``; None when the journal is of another
    scan or epoch (a stale one, to be discarded) or has no header."""
    records = _records(path)
    header = next(records, None)
    if not header or header.get("scan") != scan or header.get("epoch") != epoch:
        return None
    return [_message(scan, r) for r in records if not _is_spec(r)]


def _is_spec(record: dict) -> bool:
    """A record of a newer spec of the scan (Journal.add), not a block's events."""
    return "spec" in record and "block" not in record
