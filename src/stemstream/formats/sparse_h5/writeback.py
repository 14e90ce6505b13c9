"""Writing a growing file's pages to disk while it grows, so that making it durable at the end is
quick.

A counted file is fsync'ed before it gets its final name (a power cut must not leave a whole-looking
name over partial contents). Left to the kernel, most of a 1024 x 1024 scan's ~2 GB is still only in
the page cache when the scan ends, and that one fsync took seconds between the last frame and the
file's appearance. A background thread that syncs the file every second leaves the final fsync
about a second's worth of pages.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

WRITEBACK_INTERVAL_S = 1.0


def fsync_path(path: Path) -> None:
    """fsync ``path`` (a file or a directory) through a descriptor of its own; a path that is gone
    or a file system that refuses is not an error (the caller's own writes would have said so)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


class Writeback:
    """Syncs ``path`` to disk every ``interval_s`` in a daemon thread until :meth:`stop`. fsync
    works on the file, not on a descriptor, so the writer's own (HDF5's) writes go on meanwhile;
    the thread waits on the disk with the GIL released."""

    def __init__(self, path: Path, interval_s: float | None = None):
        self.path = Path(path)
        self.interval_s = WRITEBACK_INTERVAL_S if interval_s is None else interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"writeback {self.path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            fsync_path(self.path)

    def stop(self) -> None:
        """Stop syncing (waits for a sync under way); safe to call more than once."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
