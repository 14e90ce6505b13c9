"""The analysis interface: one analysis = a partial result, a merge, a finish and a view.

docs/architecture.md, rule 5 (one code path for files and streams): an analysis is written once and runs on
node groups (live, per batch of counted frames), in the writer (merging the node groups' partials),
offline on a counted file, and in tests, always through the same four steps:

1. ``new_partial(scan_shape)``: zeroed arrays (a dict of numpy arrays) that hold everything the
   analysis needs to accumulate, e.g. per-position sums and counts;
2. ``update(partial, positions, events, offsets)``: add a batch of counted frames, frame ``i`` at
   flat scan position ``positions[i]`` with electrons ``events[offsets[i]:offsets[i + 1]]`` (flat
   pixel indices ``row * frame_cols + col``, the counting kernel's layout, see :mod:`.batch`). A
   numba kernel that releases the GIL; no Python per frame or per electron. An analysis that sets
   ``subpixel = True`` gets a fifth argument, ``points``: each electron's sub-pixel (row, col)
   (the cluster method's; pixel centres for events counted without, see :mod:`.batch`);
3. ``merge(into, other)``: combine two partials (default: add the arrays). Partials of any split of
   the frames, merged in any order, give exactly the partial of one pass (integer sums);
4. ``finish(partial, scan_shape)``: the final results (e.g. CoM = sums / counts), and
   ``show(results)``: which of them to render as images, and how (:class:`~.views.View`).

:class:`~stemstream.analysis.scan.ScanAnalyses` runs the analyses of one scan and moves their
partials between processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from stemstream.analysis.batch import check_batch, points_of
from stemstream.analysis.checks import check_name, check_shape
from stemstream.analysis.views import View
from stemstream.core.detector import FRAME_SHAPE


class Analysis:
    """Base class of analyses. Subclass it, set :attr:`name`, and write :meth:`new_partial`,
    :meth:`update` and :meth:`finish` (and :meth:`show` if the default does not suit).

    An instance holds its parameters (checked in ``__init__``, raising ValueError with a clear
    message) for frames of ``frame_shape`` (rows, cols); it is reused for every scan. ``params``
    is a plain dict (numbers, strings, lists, dicts) stored as attributes next to the results.
    """

    #: Unique name: the HDF5 group ``/analysis/<name>`` and part of the PNG file names.
    name: ClassVar[str] = ""
    #: Keys of partial arrays whose first axis is the flat scan position (n_positions, ...).
    #: Only the rows touched since the last send travel from node groups to the writer; other
    #: arrays travel whole. Leaving a key out is always correct, just bigger on the wire.
    per_position: ClassVar[tuple[str, ...]] = ()
    #: One line per result, stored as the dataset's 'description' attribute.
    descriptions: ClassVar[dict[str, str]] = {}
    #: True: :meth:`update` also takes ``points`` (events, 2) float32, each event's (row, col) in
    #: its frame, pixel centres at integers: the cluster method's sub-pixel positions, or the
    #: event's pixel centre where the counting gave none (strict maxima). Live, in the writer and
    #: offline alike (docs/analyses.md).
    subpixel: ClassVar[bool] = False

    def __init__(self, frame_shape: tuple[int, int] = FRAME_SHAPE):
        check_name("analysis name", self.name)
        self.frame_shape = check_shape("frame_shape", frame_shape)
        self.n_pixels = self.frame_shape[0] * self.frame_shape[1]
        self.params: dict[str, Any] = {}

    # -- to write ---------------------------------------------------------------------------------

    def new_partial(self, scan_shape: tuple[int, int]) -> dict[str, np.ndarray]:
        """Zeroed partial arrays for a scan of ``scan_shape`` (rows, cols)."""
        raise NotImplementedError

    def update(self, partial: dict[str, np.ndarray], positions: np.ndarray, events: np.ndarray, offsets: np.ndarray) -> None:
        """Add a batch of frames to ``partial`` in place (a compiled kernel).

        positions (n,) int64 flat scan positions; events uint32 flat pixel indices; offsets (n + 1,)
        int64. Called by :meth:`accumulate` / :class:`ScanAnalyses` after the batch was checked
        (offsets monotonic and inside events, every pixel inside the frame). Positions are *not*
        checked: a kernel must skip frames whose position lies outside ``0 .. n_positions - 1``
        (e.g. ``if p < 0 or p >= n: continue``), which keeps it memory safe whoever calls it.
        """
        raise NotImplementedError

    def finish(self, partial: dict[str, np.ndarray], scan_shape: tuple[int, int]) -> dict[str, np.ndarray]:
        """Final results from a (merged) partial; must not modify ``partial``."""
        raise NotImplementedError

    # -- defaults ---------------------------------------------------------------------------------

    def merge(self, into: dict[str, np.ndarray], other: Mapping[str, np.ndarray]) -> None:
        """Merge ``other`` into ``into`` in place. Default: add array by array. ``into``'s
        per-position arrays may be views on a window of rows, matching ``other``'s."""
        for key, value in other.items():
            into[key] += value

    def reset(self, partial: dict[str, np.ndarray]) -> None:
        """Make ``partial`` the identity of :meth:`merge` again (default: zeros). Per-position
        arrays may be views on a window of rows."""
        for value in partial.values():
            value.fill(0)

    def show(self, results: Mapping[str, np.ndarray]) -> dict[str, View]:
        """Images to render, by name (a PNG each). Default: every 2-D result, grey scale."""
        return {key: View(value) for key, value in results.items() if np.ndim(value) == 2}

    def result_attrs(self, results: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        """Extra attributes per result dataset (e.g. a detector's radii). Default: none."""
        return {}

    # -- provided ---------------------------------------------------------------------------------

    def accumulate(self, partial: dict[str, np.ndarray], positions, events, offsets, points=None) -> None:
        """Check a batch (ValueError if it is inconsistent) and :meth:`update` ``partial`` with it
        (with ``points``, or the events' pixel centres, for a :attr:`subpixel` analysis). Frames
        outside the scan are left to the kernel here; :class:`ScanAnalyses` drops them."""
        positions, events, offsets = check_batch(positions, events, offsets, self.n_pixels)
        if not len(positions):
            return
        if self.subpixel:
            self.update(partial, positions, events, offsets, points_of(points, events, self.frame_shape))
        else:
            self.update(partial, positions, events, offsets)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}(frame_shape={self.frame_shape}, {params})"
