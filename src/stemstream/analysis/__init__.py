"""Analyses of counted events, written once and run live on node groups, offline and in tests.

Each analysis is a partial result plus a merge (architecture rule 5; see :mod:`.base` and
docs/analyses.md): node groups accumulate partials from their batches of counted frames, the
writer merges them and finishes the results, ``analyze_counted_file`` runs the same code over a
counted file.

The registry
------------
:data:`ANALYSES` maps names to analysis classes; :func:`register` adds one (one line at the bottom
of its module, or as a class decorator). Built in:

- ``virtual_detectors``: annular bright field and dark field images (plus any extra annuli) and
  the counts image (:mod:`.virtual_detectors`);
- ``summed_pattern``: the summed diffraction pattern (:mod:`.virtual_detectors`);
- ``center_of_mass``: CoM per position and the DPC phase (:mod:`.center_of_mass`);
- ``radial_profile``: the documented example for method developers, not on by default
  (:mod:`.example_radial_profile`).

Configuration
-------------
:func:`default_analyses` builds the analyses from a mapping (e.g. the ``[analysis]`` table of the
pipeline's TOML config)::

    enabled = ["virtual_detectors", "summed_pattern", "center_of_mass", "radial_profile"]
    modules = ["my_lab.my_analysis"]      # imported first, so their register() lines run

    [analysis.virtual_detectors]
    center = [288, 290]                   # (row, col) px; absent: stempy's default (288, 288)
    bright_field = [0, 70]                # (inner, outer) px
    annular_dark_field = [90, 288]

    [analysis.center_of_mass]
    crop_to = 100
    rotation_deg = 12.5

Unknown names or parameters raise ValueError naming them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from stemstream.analysis.base import (
    ANALYSES,
    DEFAULT_FRAME_SHAPE,
    Analysis,
    PartialsMessage,
    ScanAnalyses,
    View,
    check_batch,
    decode_partials,
    encode_partials,
    register,
    warm_up,
)
from stemstream.analysis.center_of_mass import CenterOfMass, dpc_phase, stempy_com
from stemstream.analysis.virtual_detectors import SummedPattern, VirtualDetectors
from stemstream.analysis.example_radial_profile import RadialProfile

#: What runs when the configuration does not say.
DEFAULT_ENABLED = ("virtual_detectors", "summed_pattern", "center_of_mass")

_CONFIG_KEYS = ("enabled", "modules")


def build_analysis(name: str, frame_shape: tuple[int, int] = DEFAULT_FRAME_SHAPE, params: Mapping[str, Any] | None = None) -> Analysis:
    """One registered analysis with its parameters; ValueError for an unknown name or parameter."""
    cls = ANALYSES.get(name)
    if cls is None:
        raise ValueError(f"unknown analysis {name!r}; known: {', '.join(sorted(ANALYSES))}")
    params = dict(params or {})
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "frame_shape")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"analysis {name!r} has no parameter {unknown[0]!r}; it takes: {', '.join(accepted) or 'none'}"
        )
    return cls(frame_shape, **params)


def default_analyses(frame_shape: tuple[int, int] = DEFAULT_FRAME_SHAPE, config: Mapping[str, Any] | None = None) -> list[Analysis]:
    """The analyses a scan runs: ``config['enabled']`` (default :data:`DEFAULT_ENABLED`), each
    with the parameters in ``config[name]``, after importing ``config['modules']``.
    ValueError for anything unknown or malformed, naming it."""
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise ValueError(f"the analysis configuration must be a table, got {type(config).__name__}")
    modules = config.get("modules", [])
    if isinstance(modules, str) or not all(isinstance(m, str) for m in modules):
        raise ValueError(f"analysis modules must be a list of module names, got {modules!r}")
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"analysis module {module!r} cannot be imported: {exc}") from None
    enabled = config.get("enabled", DEFAULT_ENABLED)
    if isinstance(enabled, str) or not all(isinstance(n, str) for n in enabled):
        raise ValueError(f"enabled analyses must be a list of names, got {enabled!r}")
    if len(set(enabled)) != len(enabled):
        raise ValueError(f"an analysis is enabled twice: {list(enabled)}")
    for key, value in config.items():
        if key in _CONFIG_KEYS:
            continue
        if key not in ANALYSES:
            raise ValueError(f"the analysis configuration has settings for unknown analysis {key!r}; known: {', '.join(sorted(ANALYSES))}")
        if not isinstance(value, Mapping):
            raise ValueError(f"settings of analysis {key!r} must be a table of parameters, got {value!r}")
    return [build_analysis(name, frame_shape, config.get(name)) for name in enabled]


__all__ = [
    "ANALYSES",
    "DEFAULT_ENABLED",
    "Analysis",
    "CenterOfMass",
    "PartialsMessage",
    "RadialProfile",
    "ScanAnalyses",
    "SummedPattern",
    "View",
    "VirtualDetectors",
    "build_analysis",
    "check_batch",
    "decode_partials",
    "default_analyses",
    "dpc_phase",
    "encode_partials",
    "register",
    "stempy_com",
    "warm_up",
]
