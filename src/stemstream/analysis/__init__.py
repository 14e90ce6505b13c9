"""Analyses of counted events, written once and run live on node groups, offline and in tests.

Each analysis is a partial result plus a merge (docs/architecture.md, rule 5; see :mod:`.interface` and
docs/analyses.md): node groups accumulate partials from their batches of counted frames, the
writer merges them and finishes the results (:mod:`.scan`), ``analyze_counted_file``
(:mod:`.offline`) runs the same code over a counted file.

The modules
-----------
- :mod:`.interface`: the :class:`Analysis` base class; :mod:`.views`: :class:`View` and PNG files;
- :mod:`.checks`: parameter checks; :mod:`.batch`: batches of counted frames and their checks;
- :mod:`.registry`: :data:`ANALYSES`, :func:`register`, :func:`build_analysis`, :func:`default_analyses`;
- :mod:`.scan`: :class:`ScanAnalyses` (partials between processes: stemstream.formats.partials);
  :mod:`.warmup`: :func:`warm_up`;
- :mod:`.offline`: :func:`~.offline.analyze_counted_file`; :mod:`.results_store`: results in the
  file's ``/analysis`` group;
- :mod:`.stored` and :mod:`.figures`: what the dashboard and ``stemstream show`` read and draw.

The registry
------------
:data:`ANALYSES` maps names to analysis classes; :func:`register` adds one (one line at the bottom
of its module, or as a class decorator). Built in (registered when this package is imported):

- ``virtual_detectors``: annular bright field and dark field images (plus any extra annuli) and
  the counts image (:mod:`.virtual_detectors`);
- ``summed_pattern``: the summed diffraction pattern (:mod:`.virtual_detectors`);
- ``center_of_mass``: CoM per position and the DPC phase (:mod:`.center_of_mass`);
- ``radial_profile``: the documented example for method developers, not on by default
  (:mod:`.example_radial_profile`);
- ``upsampled_pattern``: the summed pattern on a grid ``factor`` times finer, from the electrons'
  sub-pixel positions (the cluster method's), not on by default (:mod:`.upsampled_pattern`).

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

from stemstream.analysis.batch import check_batch
from stemstream.analysis.interface import Analysis
from stemstream.analysis.registry import ANALYSES, DEFAULT_ENABLED, build_analysis, default_analyses, register
from stemstream.analysis.scan import ScanAnalyses
from stemstream.analysis.views import View
from stemstream.analysis.warmup import warm_up
from stemstream.formats.partials import PartialsMessage, decode_partials, encode_partials

# The built-in analyses: importing them runs their register() lines.
from stemstream.analysis.center_of_mass import CenterOfMass, dpc_phase, stempy_com
from stemstream.analysis.virtual_detectors import SummedPattern, VirtualDetectors
from stemstream.analysis.example_radial_profile import RadialProfile
from stemstream.analysis.upsampled_pattern import UpsampledPattern

__all__ = [
    "ANALYSES",
    "DEFAULT_ENABLED",
    "Analysis",
    "CenterOfMass",
    "PartialsMessage",
    "RadialProfile",
    "ScanAnalyses",
    "SummedPattern",
    "UpsampledPattern",
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
