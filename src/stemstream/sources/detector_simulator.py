"""The scan-level detector simulator: what to simulate (SimulationConfig) and the frames of a
scan (DetectorSimulator), whole or as one module's sector or raw records, in any order and batching.

See sources.simulator for what a simulated frame holds. The simulator keeps the detector's
response tables (sources.detector_response), the specimen's patterns of the last few blocks of
scan positions, and the stream keys of its seed; the frames themselves come from one compiled
kernel call per batch (sources.render.render_rows).
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from stemstream.core.detector import (
    FRAME_COLS,
    FRAME_PIXELS,
    FRAME_ROWS,
    HEADER_BYTES,
    MAX_FRAME_NUMBER,
    MAX_SCAN_NUMBER,
    MAX_SCAN_SIDE,
    N_MODULES,
    RECORD_BYTES,
    RECORD_DTYPE,
    SECTOR_ROWS,
)
from stemstream.sources.detector_response import (
    ADU_MAX,
    CHARGE_MODELS,
    N_STAMPS,
    NOISE_POOL_VALUES,
    NOISE_STRIDE_SPREAD,
    bad_pixels,
    charge_stamps,
    corner_stamps,
    noise_pool,
)
from stemstream.sources.electrons import BAND_EDGES, STAMP_BITS, component_densities
from stemstream.sources.random_streams import (
    DOMAIN_DETECTOR,
    DOMAIN_DROPS,
    DOMAIN_FRAMES,
    mix64_int,
    sector_uniforms,
    stream_keys,
)
from stemstream.sources.render import render_rows, write_headers
from stemstream.sources.specimen import SyntheticSpecimen

assert N_STAMPS == 1 << STAMP_BITS  # an electron's draw picks its stamp with STAMP_BITS bits
_PATTERN_BLOCK = 1024  # scan positions whose diffraction patterns are computed at once
_PATTERN_BLOCKS_KEPT = 4


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate. Raises ValueError on construction for an invalid value.

    scan_shape: (rows, cols) of the scan. dose: mean electrons/pixel/frame over the whole frame.
    pedestal, read_noise: ADU. electron_adu_mean: mean total charge of one electron (ADU), gamma
    distributed with shape electron_adu_shape (std = mean / sqrt(shape)); charge_model "landau":
    Moyal-distributed instead, same mean and std (docs/counting.md). charge_cloud_sigma: px,
    width of the charge cloud that spreads an electron over its 3x3 neighbourhood. xray_rate: X-ray
    hits per frame, each of xray_adu = (low, high) ADU (uniform) on one pixel. hot_adu: (low, high)
    ADU range of the hot pixels' constant values. drop_sector_probability: chance that one module's
    sector of one frame is lost on the network (such sectors are not emitted or written).
    """

    scan_shape: tuple[int, int]
    frames_per_position: int = 1
    dose: float = 0.002
    seed: int = 0
    scan_number: int = 1
    first_frame_number: int = 1
    pedestal: float = 20.0
    read_noise: float = 2.0
    electron_adu_mean: float = 120.0
    electron_adu_shape: float = 4.0
    charge_cloud_sigma: float = 0.15
    xray_rate: float = 0.01
    xray_adu: tuple[float, float] = (2000.0, 10000.0)
    n_hot_pixels: int = 5
    hot_adu: tuple[float, float] = (200.0, 500.0)
    n_dead_pixels: int = 5
    drop_sector_probability: float = 0.0
    charge_model: str = "gamma"

    def __post_init__(self) -> None:
        try:
            rows, cols = (operator.index(v) for v in self.scan_shape)
        except (TypeError, ValueError):
            raise ValueError(f"scan_shape must be (rows, cols), two integers, got {self.scan_shape!r}") from None
        if not (0 < rows <= MAX_SCAN_SIDE and 0 < cols <= MAX_SCAN_SIDE):
            raise ValueError(
                f"scan_shape (rows, cols) must be positive and at most {MAX_SCAN_SIDE} each, got {(rows, cols)}"
            )
        object.__setattr__(self, "scan_shape", (rows, cols))
        for name in ("frames_per_position", "seed", "scan_number", "first_frame_number", "n_hot_pixels", "n_dead_pixels"):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, operator.index(value))
            except TypeError:
                raise ValueError(f"{name} must be an integer, got {value!r}") from None
        for name in ("xray_adu", "hot_adu"):
            value = getattr(self, name)
            try:
                low, high = (float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be (low, high) in ADU, got {value!r}") from None
            if not 0 <= low <= high <= ADU_MAX:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high <= {ADU_MAX} ADU, got {(low, high)}")
            object.__setattr__(self, name, (low, high))
        if self.frames_per_position < 1:
            raise ValueError(f"frames_per_position must be >= 1, got {self.frames_per_position}")
        if not 0 <= self.dose <= 1:  # also rejects NaN; beyond ~0.1 counting is meaningless anyway
            raise ValueError(f"dose must be in 0..1 electrons/pixel/frame, got {self.dose}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0 <= self.scan_number <= MAX_SCAN_NUMBER:  # a uint32 in the record header
            raise ValueError(f"scan_number must fit in uint32, got {self.scan_number}")
        n_frames = rows * cols * self.frames_per_position
        if self.first_frame_number < 0 or self.first_frame_number + n_frames - 1 > MAX_FRAME_NUMBER:
            raise ValueError(
                f"frame numbers {self.first_frame_number}..{self.first_frame_number + n_frames - 1} do not fit in uint32"
            )
        if not 0 <= self.pedestal <= 1000:
            raise ValueError(f"pedestal must be in 0..1000 ADU, got {self.pedestal}")
        if not 0 <= self.read_noise <= 100:
            raise ValueError(f"read_noise must be in 0..100 ADU, got {self.read_noise}")
        if not self.electron_adu_mean > 0 or not self.electron_adu_shape > 0:
            raise ValueError(
                f"electron_adu_mean and electron_adu_shape must be > 0, got {self.electron_adu_mean}, "
                f"{self.electron_adu_shape}"
            )
        if self.charge_model not in CHARGE_MODELS:
            raise ValueError(f"charge_model must be one of {', '.join(CHARGE_MODELS)}, got {self.charge_model!r}")
        if not 0 < self.charge_cloud_sigma <= 2:
            raise ValueError(f"charge_cloud_sigma must be in (0, 2] px, got {self.charge_cloud_sigma}")
        if not (math.isfinite(self.xray_rate) and self.xray_rate >= 0):
            raise ValueError(f"xray_rate must be >= 0 X-rays/frame, got {self.xray_rate}")
        if self.n_hot_pixels < 0 or self.n_dead_pixels < 0 or self.n_hot_pixels + self.n_dead_pixels > 10_000:
            raise ValueError(
                f"n_hot_pixels and n_dead_pixels must be >= 0 and together <= 10000, got "
                f"{self.n_hot_pixels}, {self.n_dead_pixels}"
            )
        if not 0 <= self.drop_sector_probability <= 1:
            raise ValueError(f"drop_sector_probability must be in [0, 1], got {self.drop_sector_probability}")

    @property
    def n_positions(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def n_frames(self) -> int:
        return self.n_positions * self.frames_per_position


@dataclass
class FrameBatch:
    """Consecutive simulated frames.

    frame_numbers: (n,) uint32 detector frame counters. positions: (n,) int64 flat scan positions
    ``y * cols + x``. frames: (n, FRAME_ROWS, FRAME_COLS) uint16 ADU, (rows, cols). true_events: per
    frame, the sorted unique flat pixel indices ``row * FRAME_COLS + col`` (uint32) where electrons
    landed (not hot pixels, not X-rays; electrons in dropped sectors included). electron_counts:
    (n,) int64 electrons drawn per frame (can exceed len(true_events[i]) when two land on one pixel).
    """

    frame_numbers: np.ndarray
    positions: np.ndarray
    frames: np.ndarray
    true_events: list[np.ndarray]
    electron_counts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.frame_numbers)


@dataclass
class SectorBatch:
    """Sector ``module`` (frame rows ``core.detector.sector_rows(module)``) of consecutive frames.

    frame_numbers: (n,) uint32. positions: (n,) int64 flat scan positions. sectors: (n, SECTOR_ROWS,
    FRAME_COLS) uint16 ADU, (rows, cols), equal to the same rows of the whole frames. dropped: (n,)
    bool, True where this module's sector of the frame is lost on the network (it is rendered all
    the same). electron_counts: (n,) int64 electrons drawn over the whole frame. No true events:
    they are a whole-frame property.
    """

    module: int
    frame_numbers: np.ndarray
    positions: np.ndarray
    sectors: np.ndarray
    dropped: np.ndarray
    electron_counts: np.ndarray

    def __len__(self) -> int:
        return len(self.frame_numbers)


class DetectorSimulator:
    """Generates the frames of one simulated scan, in any order and any batching.

    ``batch(start, count)`` gives frames ``start .. start+count-1`` (frame indices, 0-based); the
    same index always gives the same frame for a given config. Generation runs in a compiled kernel
    that releases the GIL, so several threads can generate batches at once.
    """

    def __init__(self, config: SimulationConfig, specimen: SyntheticSpecimen | None = None):
        self.config = config
        self.specimen = specimen if specimen is not None else SyntheticSpecimen(config.scan_shape, config.seed)
        if self.specimen.scan_shape != config.scan_shape:
            raise ValueError(f"specimen scan_shape {self.specimen.scan_shape} != config scan_shape {config.scan_shape}")
        self._frame_key = np.uint64(mix64_int(config.seed ^ DOMAIN_FRAMES))
        self._drop_key = np.uint64(mix64_int(config.seed ^ DOMAIN_DROPS))
        # The detector's tables, in this order from one generator (the order is part of the seed's frames).
        rng = np.random.default_rng([config.seed, DOMAIN_DETECTOR])
        self._noise_pool, self._noise_base = noise_pool(rng, config.read_noise, config.pedestal)
        self._stamps = charge_stamps(rng, config.electron_adu_mean, config.electron_adu_shape, config.charge_cloud_sigma,
                                     config.charge_model)
        self._corners, self._wide = corner_stamps(self._stamps)
        # Flat pixel indices (row * FRAME_COLS + col), sorted, and the hot pixels' values.
        self.hot_pixels, self.dead_pixels, self.hot_values = bad_pixels(
            rng, config.n_hot_pixels, config.n_dead_pixels, config.hot_adu
        )
        self._pattern_lock = threading.Lock()  # guards _pattern_cache: batches may run in threads
        self._pattern_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def n_frames(self) -> int:
        """Frames in the scan: rows * cols * frames_per_position."""
        return self.config.n_frames

    def _check_range(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self.n_frames:
            raise ValueError(f"frames {start}..{start + count - 1} outside the scan's 0..{self.n_frames - 1}")

    def _render(
        self,
        out: np.ndarray,
        frame_stride: int,
        data_offset: int,
        row0: int,
        n_rows: int,
        whole_counts: bool,
        track_truth: bool,
        indices: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Run the kernel (render_rows) for frame indices (n,) int64 into the flat uint16 ``out``."""
        cfg = self.config
        comp_row, comp_col, comp_radius, comp_density = self._pattern_tables(indices // cfg.frames_per_position)
        return render_rows(
            out,
            frame_stride,
            data_offset,
            FRAME_ROWS,
            FRAME_COLS,
            row0,
            n_rows,
            whole_counts,
            track_truth,
            stream_keys(self._frame_key, indices),
            self._noise_pool,
            NOISE_POOL_VALUES,
            self._noise_base,
            NOISE_STRIDE_SPREAD,
            BAND_EDGES,
            comp_row,
            comp_col,
            comp_radius,
            comp_density,
            self._corners,
            self._wide,
            self._stamps,
            float(cfg.xray_rate),
            cfg.xray_adu[0],
            cfg.xray_adu[1],
            self.hot_pixels,
            self.hot_values,
            self.dead_pixels,
        )

    def _pattern_tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The kernel's view of the specimen at positions (n,) int64: disk centre rows, centre cols,
        radii and electron densities (electrons per px^2, see electrons.component_densities), each (n, C)
        float64, C-contiguous. Computed for blocks of
        _PATTERN_BLOCK positions and kept for the last few blocks: SyntheticSpecimen.patterns costs
        ~0.1 ms a call whatever the number of positions, as much as rendering several sectors, and a
        position's pattern then does not depend on the batch it is asked for in."""
        if len(positions) == 0:
            return tuple(table[:0] for table in self._pattern_block(0))
        low, high = int(positions[0]), int(positions[-1])  # positions come in ascending order
        first = low // _PATTERN_BLOCK
        last = high // _PATTERN_BLOCK
        blocks = [self._pattern_block(b) for b in range(first, last + 1)]
        if len(blocks) == 1:
            tables = blocks[0]
        else:
            tables = tuple(np.concatenate(parts) for parts in zip(*blocks))
        if high - low + 1 == len(positions):  # consecutive positions (one frame each): views, no copies
            offset = low - first * _PATTERN_BLOCK
            return tuple(table[offset : offset + len(positions)] for table in tables)
        relative = positions - first * _PATTERN_BLOCK
        return tuple(table[relative] for table in tables)

    def _pattern_block(self, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        with self._pattern_lock:
            tables = self._pattern_cache.get(block)
            if tables is None:
                start = block * _PATTERN_BLOCK
                patterns = self.specimen.patterns(np.arange(start, min(start + _PATTERN_BLOCK, self.config.n_positions)))
                comp_row = np.ascontiguousarray(patterns.centres[..., 0])
                comp_col = np.ascontiguousarray(patterns.centres[..., 1])
                comp_radius = np.ascontiguousarray(patterns.radii)
                density = component_densities(
                    comp_row,
                    comp_col,
                    comp_radius,
                    np.ascontiguousarray(patterns.probabilities),
                    FRAME_ROWS,
                    FRAME_COLS,
                    self.config.dose * FRAME_PIXELS,
                )
                tables = (comp_row, comp_col, comp_radius, density)
                self._pattern_cache[block] = tables
                while len(self._pattern_cache) > _PATTERN_BLOCKS_KEPT:
                    del self._pattern_cache[next(iter(self._pattern_cache))]
            return tables

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_pattern_lock"], state["_pattern_cache"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pattern_lock = threading.Lock()
        self._pattern_cache = {}

    def batch(self, start: int, count: int, *, out: np.ndarray | None = None) -> FrameBatch:
        """Frames ``start .. start+count-1`` (frame indices). ``out``, if given, is a C-contiguous
        (count, FRAME_ROWS, FRAME_COLS) uint16 array to fill (saves allocating; the batch's frames are then ``out``).
        Without ``out``, keep count <= 32 (21 MB) for speed: on Linux, blocks over 32 MB are fresh
        memory every time, and page-faulting it in costs about as much as generating the frames.
        Raises ValueError for a range outside the scan or a wrong ``out``."""
        self._check_range(start, count)
        cfg = self.config
        if out is None:
            out = np.empty((count, FRAME_ROWS, FRAME_COLS), np.uint16)
        elif out.shape != (count, FRAME_ROWS, FRAME_COLS) or out.dtype != np.uint16 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous ({count}, {FRAME_ROWS}, {FRAME_COLS}) uint16 array")
        indices = np.arange(start, start + count, dtype=np.int64)
        positions = indices // cfg.frames_per_position
        counts, events, offsets, n_events = self._render(
            out.reshape(-1), FRAME_PIXELS, 0, 0, FRAME_ROWS, True, True, indices
        )
        true_events = [events[offsets[i] : offsets[i] + n_events[i]] for i in range(count)]
        return FrameBatch(
            frame_numbers=(indices + cfg.first_frame_number).astype(np.uint32),
            positions=positions,
            frames=out,
            true_events=true_events,
            electron_counts=counts,
        )

    def batches(self, batch_size: int = 64) -> Iterator[FrameBatch]:
        """All frames of the scan in order, ``batch_size`` at a time (the last batch may be shorter)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, self.n_frames, batch_size):
            yield self.batch(start, min(batch_size, self.n_frames - start))

    def sector_batch(self, start: int, count: int, module: int, *, out: np.ndarray | None = None) -> SectorBatch:
        """Sector ``module`` of frames ``start .. start+count-1``: exactly
        ``batch(start, count).frames[:, sector_rows(module)]``, for the work of the sector's
        rows and electrons (only the electrons whose charge can reach the sector are drawn; the
        whole frame's electron counts are drawn too, for ``electron_counts``). ``out``, if given, is a
        C-contiguous (count, SECTOR_ROWS, FRAME_COLS) uint16 array to fill. Raises ValueError for a
        range outside the scan, a module outside 0 .. N_MODULES-1 or a wrong ``out``."""
        self._check_range(start, count)
        module = self._check_module(module)
        if out is None:
            out = np.empty((count, SECTOR_ROWS, FRAME_COLS), np.uint16)
        elif out.shape != (count, SECTOR_ROWS, FRAME_COLS) or out.dtype != np.uint16 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous ({count}, {SECTOR_ROWS}, {FRAME_COLS}) uint16 array")
        indices = np.arange(start, start + count, dtype=np.int64)
        counts, _, _, _ = self._render(
            out.reshape(-1), SECTOR_ROWS * FRAME_COLS, 0, module * SECTOR_ROWS, SECTOR_ROWS, True, False, indices
        )
        return SectorBatch(
            module=module,
            frame_numbers=(indices + self.config.first_frame_number).astype(np.uint32),
            positions=indices // self.config.frames_per_position,
            sectors=out,
            dropped=self._dropped(indices)[:, module],
            electron_counts=counts,
        )

    def records(self, start: int, count: int, module: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """What receiver ``module`` gets of frames ``start .. start+count-1``: a RECORD_DTYPE array, one
        record per frame whose sector is not dropped, in frame order, with the header that
        formats.raw.make_sector_records writes and the sector of ``sector_batch``. The sectors are
        rendered straight into the records (no copy); dropped sectors are not rendered at all.
        ``out``, if given, is a C-contiguous 1-D RECORD_DTYPE array of at least ``count`` records to
        fill (saves allocating): the result is then its first records. Raises ValueError for a range
        outside the scan, a module outside 0 .. N_MODULES-1 or a wrong ``out``."""
        self._check_range(start, count)
        module = self._check_module(module)
        if out is not None and (
            out.dtype != RECORD_DTYPE or out.ndim != 1 or len(out) < count or not out.flags.c_contiguous
        ):
            raise ValueError(f"out must be a C-contiguous 1-D RECORD_DTYPE array of at least {count} records")
        cfg = self.config
        indices = np.arange(start, start + count, dtype=np.int64)
        if cfg.drop_sector_probability > 0.0:
            indices = indices[~self._dropped(indices)[:, module]]
        records = np.empty(len(indices), RECORD_DTYPE) if out is None else out[: len(indices)]
        rows, cols = cfg.scan_shape
        # The records as uint16: record i's pixels start HEADER_BYTES into it (both sizes are even).
        words = records.view(np.uint16)
        write_headers(words, RECORD_BYTES // 2, indices, cfg.scan_number, cfg.first_frame_number, rows, cols, cfg.frames_per_position)
        self._render(
            words,
            RECORD_BYTES // 2,
            HEADER_BYTES // 2,
            module * SECTOR_ROWS,
            SECTOR_ROWS,
            False,
            False,
            indices,
        )
        return records

    @staticmethod
    def _check_module(module: int) -> int:
        try:
            module = operator.index(module)
        except TypeError:
            raise ValueError(f"module must be an integer, got {module!r}") from None
        if not 0 <= module < N_MODULES:
            raise ValueError(f"module {module} outside 0..{N_MODULES - 1}")
        return module

    def _dropped(self, indices: np.ndarray) -> np.ndarray:
        """(n, N_MODULES) bool drop flags of frame indices (n,) int64."""
        p = self.config.drop_sector_probability
        if p == 0.0:
            return np.zeros((len(indices), N_MODULES), bool)
        return sector_uniforms(self._drop_key, indices, N_MODULES) < p

    def dropped_sectors(self, batch: FrameBatch) -> np.ndarray:
        """(n, N_MODULES) bool: True where module m's sector of frame i is lost. Deterministic per seed and
        frame; all False when drop_sector_probability is 0."""
        return self._dropped(batch.frame_numbers.astype(np.int64) - self.config.first_frame_number)
