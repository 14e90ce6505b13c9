"""Shared memory for the data path when every role runs on one host.

On one host, moving each block of sectors through sockets costs a kernel copy per hop (producer ->
gateway -> node group: four copies of 663 kB per frame). With ``[network] shared_memory = true``
a producer renders (or reads) each block straight into a slot of a file in ``shm_dir``
(/dev/shm, memory) that it owns, and sends only a small descriptor ``{name, offset, nbytes}``;
the gateway routes descriptors exactly as it routes blocks, and the node group maps the file and
counts from the slot in place.

A slot is the producer's resend buffer entry for that block: it is reused only after the writer
committed the block (see core.scan_spec), so by then every node group that could read it has
finished with it; the one exception is a node group whose stream a failover superseded, whose
results are dropped anyway.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
from pathlib import Path

import numpy as np

from stemstream.core.detector import RECORD_BYTES, RECORD_DTYPE
from stemstream.transport.messages import MessageError

_NAME = re.compile(r"^stemstream-[A-Za-z0-9_.-]{1,100}$")


def segment_prefix(control_port: int) -> str:
    """Every segment of one pipeline (named by its control port) starts with this."""
    return f"stemstream-{control_port}-"


def segment_bytes(slot_records: int, n_slots: int) -> int:
    """Size of a producer's segment of ``n_slots`` slots of ``slot_records`` records."""
    return slot_records * RECORD_BYTES * n_slots


class SlotRing:
    """A producer's segment: ``n_slots`` slots of ``slot_records`` sector records each."""

    def __init__(self, directory: str | Path, name: str, slot_records: int, n_slots: int):
        if not _NAME.match(name):
            raise ValueError(f"bad shared-memory segment name {name!r}")
        self.name = name
        self.path = Path(directory) / name
        self.slot_bytes = slot_records * RECORD_BYTES
        self.slot_records = slot_records
        need = segment_bytes(slot_records, n_slots)
        free = shutil.disk_usage(directory).free
        if free < need:  # a full tmpfs kills the process (SIGBUS) at the first page it cannot back
            raise OSError(f"shared memory: {directory} has {free / 2**20:.0f} MiB free, a producer's segment needs "
                          f"{need / 2**20:.0f} MiB ([flow] retain_blocks + 2 blocks); make room or set "
                          f"[network] shared_memory = false")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, self.slot_bytes * n_slots)
            self._map = mmap.mmap(fd, self.slot_bytes * n_slots)
        finally:
            os.close(fd)
        self._records = np.frombuffer(self._map, RECORD_DTYPE)
        self.free = list(range(n_slots - 1, -1, -1))

    def acquire(self) -> int | None:
        return self.free.pop() if self.free else None

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def view(self, slot: int, n: int) -> np.ndarray:
        """The first ``n`` records of ``slot`` (to fill)."""
        if n > self.slot_records:
            raise ValueError(f"{n} records do not fit a slot of {self.slot_records}")
        start = slot * self.slot_records
        return self._records[start:start + n]

    def descriptor(self, slot: int, n: int) -> dict:
        return {"name": self.name, "offset": slot * self.slot_bytes, "nbytes": n * RECORD_BYTES}

    def close(self) -> None:
        self._records = None
        try:
            self._map.close()
        except BufferError:  # a view is still exported (e.g. queued in a socket): the OS frees it at exit
            pass
        self.path.unlink(missing_ok=True)


class Attachments:
    """A node group's read-only maps of the producers' segments, opened on first use."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._maps: dict[str, np.ndarray] = {}

    def records(self, descriptor: dict, n: int) -> np.ndarray:
        """The ``n`` records a descriptor points at; MessageError('bad_descriptor') if it cannot
        be (unknown segment, range outside it, size not ``n`` records)."""
        name, offset, nbytes = descriptor["name"], descriptor["offset"], descriptor["nbytes"]
        if nbytes != n * RECORD_BYTES or offset % RECORD_BYTES:
            raise MessageError("bad_descriptor", f"{nbytes} bytes at {offset} for {n} records")
        data = self._maps.get(name)
        if data is None:
            try:
                with open(self.directory / name, "rb") as f:
                    data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
            except (OSError, ValueError) as exc:
                raise MessageError("bad_descriptor", f"segment {name}: {exc}") from None
            self._maps[name] = data
        if offset + nbytes > data.nbytes:
            raise MessageError("bad_descriptor", f"{nbytes} bytes at {offset} beyond segment {name}")
        return data[offset:offset + nbytes].view(RECORD_DTYPE)

    def validate_name(self, name) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise MessageError("bad_descriptor", f"segment name {name!r}")
