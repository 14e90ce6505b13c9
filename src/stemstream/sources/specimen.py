"""A synthetic specimen: the diffraction pattern the beam makes at each scan position.

The specimen is a thin amorphous film carrying a few crystalline grains. At every scan position
the pattern is a mixture of disks on the detector:

- the bright-field (BF) disk, near the detector centre (DETECTOR_CENTRE), shifted by a few pixels by a
  smooth deflection field (the grains' projected potential plus a little descan), so that the
  centre of mass shows the grains;
- inside a grain, Bragg disks on the grain's lattice (hexagonal or square, its own orientation and
  spacing), moving with the BF disk, their intensities modulated across the grain (bend contours);
- a diffuse background, uniform over the frame (film and thermal diffuse scattering).

Electrons scattered into Bragg disks and the background leave the BF disk, so the BF disk is dimmer
over the grains: virtual bright field shows the grains dark, virtual dark field bright.

Coordinates: scan positions are flat indices ``y * cols + x``; on the detector everything is in
pixels, (row, col). The scan field is measured in *field units*: the longer scan side spans 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np
from numba import njit

from stemstream.core.detector import FRAME_COLS, FRAME_ROWS

DETECTOR_CENTRE = (FRAME_ROWS / 2, FRAME_COLS / 2)  # (row, col) px: where the undeflected BF disk sits
_CENTRE_ROW, _CENTRE_COL = DETECTOR_CENTRE  # as scalars: numba compiles them into _patterns_kernel
_MAX_BF_RADIUS = min(FRAME_ROWS, FRAME_COLS) / 2
MAX_REFLECTIONS = 8  # square lattice: 4 first-order + 4 diagonal reflections; hexagonal uses 6
N_COMPONENTS = 1 + MAX_REFLECTIONS + 1  # BF disk, Bragg disks, diffuse background
BACKGROUND_RADIUS = -1.0  # radius that marks the uniform background component


@dataclass(frozen=True)
class Grain:
    """One crystalline grain of the specimen.

    centre (row, col) and radius are in field units; spacing is the distance in detector pixels
    between the BF disk and the first-order Bragg disks; intensities and phases hold one value per
    reflection (MAX_REFLECTIONS, zero intensity for reflections the lattice does not have).
    """

    centre: tuple[float, float]
    radius: float
    thickness: float  # 0..1: scattering strength at the grain's core
    orientation: float  # radians, lattice rotation on the detector
    spacing: float  # px
    hexagonal: bool
    intensities: tuple[float, ...]
    phases: tuple[float, ...]  # radians, offset of each reflection's bend contours

    def reflections(self) -> np.ndarray:
        """(MAX_REFLECTIONS, 2) float64: (row, col) px offsets of the Bragg disks from the BF disk."""
        if self.hexagonal:
            angles = self.orientation + np.arange(6) * np.pi / 3
            lengths = np.full(6, self.spacing)
        else:
            angles = self.orientation + np.concatenate([np.arange(4) * np.pi / 2, np.pi / 4 + np.arange(4) * np.pi / 2])
            lengths = np.concatenate([np.full(4, self.spacing), np.full(4, self.spacing * np.sqrt(2.0))])
        offsets = np.zeros((MAX_REFLECTIONS, 2))
        offsets[: len(angles), 0] = lengths * np.sin(angles)
        offsets[: len(angles), 1] = lengths * np.cos(angles)
        return offsets


@dataclass(frozen=True)
class DiffractionPatterns:
    """Disk-mixture model of the diffraction patterns at n scan positions, C = N_COMPONENTS.

    Component 0 is the BF disk, 1..C-2 the Bragg disks, C-1 the diffuse background (uniform over the
    frame, radius BACKGROUND_RADIUS).

    centres: (n, C, 2) float64, disk centres (row, col) in px.
    radii: (n, C) float64, disk radii in px.
    probabilities: (n, C) float64, each row sums to 1: the share of the electrons hitting the detector
        that fall in each component (before the parts of disks outside the frame are cut off).
    """

    centres: np.ndarray
    radii: np.ndarray
    probabilities: np.ndarray

    def cumulative(self) -> np.ndarray:
        """(n, C) float64 cumulative probabilities, the last column exactly 1."""
        cum = np.cumsum(self.probabilities, axis=1)
        cum[:, -1] = 1.0
        return cum


@njit(nogil=True, cache=True)
def _patterns_kernel(
    positions, scan_cols, longer, ext_r, ext_c, descan, max_shift, grain_centres, grain_radii, grain_thickness,
    offsets, directions, intensities, norms, phases, bf_radius, film_scatter, grain_scatter, centres, radii, probs,
):
    """SyntheticSpecimen.patterns at flat positions (n,) into centres (n, C, 2), radii (n, C) and
    probs (n, C): the same arithmetic as field_coordinates, grain_map and beam_shift, a loop per
    position instead of numpy calls on (n, G) arrays (those cost ~1 us per position in all)."""
    n_grains = grain_centres.shape[0]
    n_refl = offsets.shape[1]
    n_comp = radii.shape[1]
    top = max(ext_r, ext_c)
    edge = 0.015  # field units: grain edge softness, as in _grain_thickness
    for i in range(positions.shape[0]):
        fr = (positions[i] // scan_cols + 0.5) / longer
        fc = (positions[i] % scan_cols + 0.5) / longer
        shift_r = descan * (fr - ext_r / 2) / top
        shift_c = descan * (fc - ext_c / 2) / top
        grain = -1
        thick = 0.0
        for g in range(n_grains):
            dr = fr - grain_centres[g, 0]
            dc = fc - grain_centres[g, 1]
            d2 = dr * dr + dc * dc
            t = grain_thickness[g] / (1.0 + math.exp(min(max((math.sqrt(d2) - grain_radii[g]) / edge, -50.0), 50.0)))
            if grain < 0 or t > thick:  # argmax: the first of equal thicknesses
                grain = g
                thick = t
            width = 0.7 * grain_radii[g]
            pull = max_shift * grain_thickness[g] * math.exp(0.5 - d2 / (2 * width * width)) / width
            shift_r -= pull * dr
            shift_c -= pull * dc
        if thick <= 1e-3:
            grain = -1
            thick = 0.0
        row = _CENTRE_ROW + shift_r
        col = _CENTRE_COL + shift_c
        for k in range(n_comp):
            centres[i, k, 0] = row
            centres[i, k, 1] = col
            radii[i, k] = bf_radius
            probs[i, k] = 0.0
        radii[i, n_comp - 1] = BACKGROUND_RADIUS
        scattered = film_scatter + grain_scatter * thick
        bragg_sum = 0.0
        if grain >= 0:
            rel_r = fr - grain_centres[grain, 0]
            rel_c = fc - grain_centres[grain, 1]
            for r in range(n_refl):
                centres[i, 1 + r, 0] += offsets[grain, r, 0]
                centres[i, 1 + r, 1] += offsets[grain, r, 1]
                along = rel_r * directions[grain, r, 0] + rel_c * directions[grain, r, 1]
                excitation = 0.5 + 0.5 * math.cos(2 * math.pi * along / grain_radii[grain] + phases[grain, r])
                bragg = 0.75 * grain_scatter * thick * (intensities[grain, r] * excitation) / norms[grain, 0]
                probs[i, 1 + r] = bragg
                bragg_sum += bragg
        probs[i, 0] = 1.0 - scattered
        probs[i, n_comp - 1] = scattered - bragg_sum


class SyntheticSpecimen:
    """A film with a few crystalline grains over a scan of ``scan_shape`` = (rows, cols) positions.

    Deterministic for a seed. Raises ValueError for a non-positive scan shape or bad parameters.
    """

    def __init__(
        self,
        scan_shape: tuple[int, int],
        seed: int = 0,
        *,
        n_grains: int = 4,
        bf_radius: float = 72.0,
        max_shift: float = 4.0,
        descan: float = 1.0,
        film_scatter: float = 0.05,
        grain_scatter: float = 0.6,
    ):
        rows, cols = (int(v) for v in scan_shape)
        if rows <= 0 or cols <= 0:
            raise ValueError(f"scan_shape must be two positive integers (rows, cols), got {scan_shape}")
        if n_grains < 0:
            raise ValueError(f"n_grains must be >= 0, got {n_grains}")
        if not 0 < bf_radius < _MAX_BF_RADIUS:
            raise ValueError(f"bf_radius must be in (0, {_MAX_BF_RADIUS:g}) px, got {bf_radius}")
        if not (0 <= film_scatter and 0 <= grain_scatter and film_scatter + grain_scatter <= 1):
            raise ValueError(
                f"film_scatter and grain_scatter must be >= 0 with a sum <= 1, got {film_scatter}, {grain_scatter}"
            )
        self.scan_shape = (rows, cols)
        self.bf_radius = float(bf_radius)
        self.max_shift = float(max_shift)
        self.descan = float(descan)
        self.film_scatter = float(film_scatter)
        self.grain_scatter = float(grain_scatter)
        longer = max(rows, cols)
        self._extent = (rows / longer, cols / longer)  # field size in field units (rows, cols)
        # Separate stream from the detector's, so the specimen does not change with detector settings.
        rng = np.random.default_rng([int(seed), 0x5EC1])
        self.grains: tuple[Grain, ...] = self._place_grains(rng, n_grains)
        self._offsets = np.array([g.reflections() for g in self.grains]).reshape(len(self.grains), MAX_REFLECTIONS, 2)
        self._intensities = np.array([g.intensities for g in self.grains]).reshape(len(self.grains), MAX_REFLECTIONS)
        self._phases = np.array([g.phases for g in self.grains]).reshape(len(self.grains), MAX_REFLECTIONS)
        # Per-grain constants of patterns(), computed once: patterns() runs for every block of scan
        # positions a producer streams, and its numpy calls on small arrays add up.
        self._centres = np.array([g.centre for g in self.grains]).reshape(len(self.grains), 2)
        self._radii = np.array([g.radius for g in self.grains])
        self._thickness = np.array([g.thickness for g in self.grains])
        self._directions = self._offsets / np.maximum(np.linalg.norm(self._offsets, axis=2, keepdims=True), 1e-12)
        self._norms = self._intensities.sum(axis=1, keepdims=True)

    def _random_grain(self, rng: np.random.Generator) -> Grain:
        ext_r, ext_c = self._extent
        short = min(ext_r, ext_c)
        hexagonal = bool(rng.random() < 0.5)
        n_refl = 6 if hexagonal else 8
        intensities = np.zeros(MAX_REFLECTIONS)
        intensities[:n_refl] = rng.uniform(0.3, 1.0, n_refl)
        if not hexagonal:
            intensities[4:8] *= 0.4  # diagonal reflections are weaker
        # Disks of the BF radius, spaced so that neighbouring disks do not overlap.
        spacing = rng.uniform(2.2, 2.55) * self.bf_radius
        return Grain(
            centre=(float(rng.uniform(0.1, 0.9) * ext_r), float(rng.uniform(0.1, 0.9) * ext_c)),
            radius=float(rng.uniform(0.12, 0.22) * short),
            thickness=float(rng.uniform(0.5, 1.0)),
            orientation=float(rng.uniform(0, 2 * np.pi)),
            spacing=float(spacing),
            hexagonal=hexagonal,
            intensities=tuple(float(v) for v in intensities),
            phases=tuple(float(v) for v in rng.uniform(0, 2 * np.pi, MAX_REFLECTIONS)),
        )

    def _place_grains(self, rng: np.random.Generator, n_grains: int) -> tuple[Grain, ...]:
        """Draw grain layouts until they cover a useful part of the field (some vacuum/film left)."""
        if n_grains == 0:
            return ()
        ext_r, ext_c = self._extent
        grid_r, grid_c = np.meshgrid(np.linspace(0, ext_r, 48), np.linspace(0, ext_c, 48), indexing="ij")
        grains: tuple[Grain, ...] = ()
        for _ in range(200):
            grains = tuple(self._random_grain(rng) for _ in range(n_grains))
            covered = np.zeros(grid_r.shape, bool)
            for g in grains:
                covered |= (grid_r - g.centre[0]) ** 2 + (grid_c - g.centre[1]) ** 2 < g.radius**2
            if 0.2 <= covered.mean() <= 0.6:
                break
        return grains

    def field_coordinates(self, positions: np.ndarray) -> np.ndarray:
        """(n, 2) float64 (row, col) field coordinates of flat scan positions (n,)."""
        rows, cols = self.scan_shape
        positions = np.asarray(positions, np.int64)
        longer = max(rows, cols)
        return np.stack([(positions // cols + 0.5) / longer, (positions % cols + 0.5) / longer], axis=1)

    def _grain_thickness(self, field: np.ndarray) -> np.ndarray:
        """(n, G) thickness of each grain at field points (n, 2); soft edges."""
        if not self.grains:
            return np.zeros((len(field), 0))
        delta = field[:, None, :] - self._centres[None]  # (n, G, 2)
        dist = np.sqrt(delta[..., 0] ** 2 + delta[..., 1] ** 2)  # (n, G)
        edge = 0.015  # field units: edge softness
        return self._thickness / (1.0 + np.exp(np.clip((dist - self._radii) / edge, -50, 50)))

    def grain_map(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Thickness (n,) float64 in 0..1 and index (n,) int64 of the dominant grain (-1: film only)."""
        t = self._grain_thickness(self.field_coordinates(positions))
        if t.shape[1] == 0:
            return np.zeros(len(t)), np.full(len(t), -1, np.int64)
        index = t.argmax(axis=1)
        thick = t[np.arange(len(t)), index]
        index = np.where(thick > 1e-3, index, -1)
        return np.where(index >= 0, thick, 0.0), index

    def beam_shift(self, positions: np.ndarray) -> np.ndarray:
        """(n, 2) float64 (row, col) px shift of the whole pattern at flat scan positions (n,).

        Each grain deflects the beam towards its centre (gradient of a Gaussian projected potential,
        at most ``max_shift * thickness`` px); a linear descan adds up to +-descan/2 px across the field.
        """
        field = self.field_coordinates(positions)
        ext = np.array(self._extent)
        shift = self.descan * (field - ext / 2) / ext.max()
        for g in self.grains:
            width = 0.7 * g.radius
            delta = field - np.array(g.centre)
            d2 = (delta**2).sum(axis=1, keepdims=True)
            # Peak magnitude 1 at distance `width` from the centre.
            shift -= self.max_shift * g.thickness * (delta / width) * np.exp(0.5 - d2 / (2 * width**2))
        return shift

    def patterns(self, positions: np.ndarray) -> DiffractionPatterns:
        """The disk-mixture model at flat positions (n,); see DiffractionPatterns. The BF disk sits
        at DETECTOR_CENTRE + beam_shift; over a grain (grain_map) the Bragg disks sit at the grain's
        reflections from it, each with 0.75 * grain_scatter * thickness of the electrons shared by
        the reflections' intensities, modulated by bend contours; the film and the grain scatter
        film_scatter + grain_scatter * thickness out of the BF disk, the rest of it to the background."""
        positions = np.ascontiguousarray(positions, np.int64)
        n = len(positions)
        centres = np.empty((n, N_COMPONENTS, 2))
        radii = np.empty((n, N_COMPONENTS))
        probs = np.empty((n, N_COMPONENTS))
        rows, cols = self.scan_shape
        _patterns_kernel(
            positions, cols, max(rows, cols), self._extent[0], self._extent[1], self.descan, self.max_shift,
            self._centres, self._radii, self._thickness, self._offsets, self._directions, self._intensities,
            self._norms, self._phases, self.bf_radius, self.film_scatter, self.grain_scatter, centres, radii, probs,
        )
        return DiffractionPatterns(centres=centres, radii=radii, probabilities=probs)
