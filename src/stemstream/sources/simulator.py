"""Simulator of the NCEM 4D Camera: frames a user would mistake for the real camera's.

Each frame (FRAME_ROWS x FRAME_COLS ``uint16``, (rows, cols), ADU; core.detector) is built from

- a pedestal-subtracted background near ``pedestal`` ADU with Gaussian read noise of ``read_noise``
  ADU. A pool of 2**20 noise values is drawn once; a frame takes its rows from it at a random start
  and a random row stride (no value twice in a frame), so noise costs a memory copy from the cache,
  not a random draw per pixel;
- electrons arriving as a Poisson process, ``dose`` electrons/pixel/frame on average over the frame,
  distributed as the specimen's diffraction pattern (sources.specimen) at the frame's scan position.
  An electron deposits a gamma-distributed charge (``electron_adu_mean`` ADU on average) spread by a
  Gaussian charge cloud over its landing pixel and the 8 neighbours; the landing pixel keeps the
  largest share, so it is the strict local maximum unless noise or a neighbour electron interferes;
- occasional X-rays (``xray_rate`` per frame), each putting thousands of ADU on one pixel;
- a few hot pixels (the same high value in every frame) and dead pixels (always 0).

Randomness comes from counter-based streams keyed by (seed, frame index, sub-stream): a frame is the
same whatever the batch it is generated in. The true electron landing pixels are kept with each frame.

One module's sector of frames (``DetectorSimulator.sector_batch``, ``records``: what one of the
receivers gets) is rendered on its own: the electrons are drawn per band of rows, each band from its
own sub-stream, and a sector draws only its own rows' electrons and those of the rows next to its
edges (their charge reaches it). So the sector is bit for bit the same rows of the whole frame,
charge shared across the sector boundary included, for the work of its own electrons only.

Scan order: positions row-major (x fastest), flat position ``p = y * cols + x``; with K frames per
position the K frames of a position are consecutive; frame number = ``first_frame_number`` + index.

The simulator's parts, one module each:

- sources.detector_simulator: SimulationConfig (what to simulate) and DetectorSimulator (the frames
  of a scan: whole frames with their true electrons, one module's sectors, or its raw records);
- sources.receiver_files: simulate_to_directory, a scan written as the receivers write one;
- sources.detector_response: the read-noise pool, the charge stamps, hot and dead pixels;
- sources.electrons: the Poisson process of electrons over the pattern, band by band;
- sources.render: the compiled kernel that renders frame rows from all of these;
- sources.random_streams: the counter-based random streams;
- sources.specimen: the synthetic specimen's diffraction patterns.

This module gathers their public names: other packages import them from here, and adds
:func:`landed_electrons`, the truth with multiplicity (two electrons on one pixel listed twice)
that ``FrameBatch.true_events`` (distinct pixels) cannot give, for measuring counting methods
that count coincident electrons (counting.accuracy).
"""

import numpy as np

from stemstream.core.detector import FRAME_COLS
from stemstream.sources.detector_simulator import DetectorSimulator, FrameBatch, SectorBatch, SimulationConfig
from stemstream.sources.electrons import BAND_EDGES, CANDIDATES, draw_counts, land_electrons
from stemstream.sources.random_streams import stream_keys
from stemstream.sources.receiver_files import SimulationSummary, simulate_to_directory


def landed_electrons(simulator: DetectorSimulator, start: int, count: int) -> list[np.ndarray]:
    """Where every electron of frames ``start .. start+count-1`` landed: per frame, sorted flat
    pixel indices ``row * FRAME_COLS + col`` with repeats (one entry per electron). The same draws
    as the rendering kernel's (sources.render.render_rows: the frames' streams, all bands), so
    ``np.unique`` of a frame's array is ``batch(...).true_events`` of that frame."""
    simulator._check_range(start, count)
    indices = np.arange(start, start + count, dtype=np.int64)
    comp_row, comp_col, comp_radius, comp_density = simulator._pattern_tables(
        indices // simulator.config.frames_per_position)
    last = len(BAND_EDGES) - 2
    n_drawn, after, counts = draw_counts(stream_keys(simulator._frame_key, indices), BAND_EDGES, comp_row, comp_col,
                                         comp_radius, comp_density, FRAME_COLS, 0, last)
    most = int(counts.max()) if count else 0
    hit_row, hit_col = np.empty(most, np.int64), np.empty(most, np.int64)
    hit_stamp = np.empty(most, np.uint64)
    work = (np.empty(CANDIDATES, np.uint64), np.empty(CANDIDATES), np.empty(CANDIDATES), np.empty(CANDIDATES, np.int64))
    frames = []
    for f in range(count):
        n = land_electrons(f, n_drawn, after, 0, last, BAND_EDGES, comp_row, comp_col, comp_radius, 0, FRAME_COLS,
                           hit_row, hit_col, hit_stamp, *work)
        frames.append(np.sort(hit_row[:n] * FRAME_COLS + hit_col[:n]).astype(np.uint32))
    return frames

__all__ = [
    "DetectorSimulator",
    "FrameBatch",
    "SectorBatch",
    "SimulationConfig",
    "SimulationSummary",
    "landed_electrons",
    "simulate_to_directory",
]
