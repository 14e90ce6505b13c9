"""The registry of analysis classes, and building the analyses a configuration asks for.

:data:`ANALYSES` maps names to classes; :func:`register` adds one (a line at the bottom of its
module, or a class decorator), so analysis modules register themselves without importing the
package's ``__init__``. :func:`default_analyses` builds what the ``[analysis]`` table of the
pipeline's configuration enables (see the package docstring for the table's keys).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from stemstream.analysis.checks import check_name
from stemstream.analysis.interface import Analysis
from stemstream.core.detector import FRAME_SHAPE

#: Analysis classes by name. Fill it with :func:`register`.
ANALYSES: dict[str, type[Analysis]] = {}

#: What runs when the configuration does not say.
DEFAULT_ENABLED = ("virtual_detectors", "summed_pattern", "center_of_mass")

#: Keys of the configuration table that are not an analysis's settings.
_CONFIG_KEYS = ("enabled", "modules")


def register(analysis: type[Analysis]) -> type[Analysis]:
    """Register an analysis class under its ``name`` (usable as a class decorator); returns it.

    Registering another class under a taken name raises ValueError (re-registering the same
    class, e.g. on a module reload, replaces it)."""
    if not (isinstance(analysis, type) and issubclass(analysis, Analysis)):
        raise ValueError(f"register() takes an Analysis subclass, got {analysis!r}")
    name = check_name("analysis name", analysis.name)
    old = ANALYSES.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (analysis.__module__, analysis.__qualname__):
        raise ValueError(f"an analysis named {name!r} is already registered ({old.__module__}.{old.__qualname__})")
    ANALYSES[name] = analysis
    return analysis


def build_analysis(name: str, frame_shape: tuple[int, int] = FRAME_SHAPE, params: Mapping[str, Any] | None = None) -> Analysis:
    """One registered analysis for frames of ``frame_shape`` (rows, cols) with its parameters;
    ValueError for an unknown name or parameter."""
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


def default_analyses(frame_shape: tuple[int, int] = FRAME_SHAPE, config: Mapping[str, Any] | None = None) -> list[Analysis]:
    """The analyses a scan runs on frames of ``frame_shape`` (rows, cols): ``config['enabled']``
    (default :data:`DEFAULT_ENABLED`), each with the parameters in ``config[name]``, after
    importing ``config['modules']``. ValueError for anything unknown or malformed, naming it."""
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise ValueError(f"the analysis configuration must be a table, got {type(config).__name__}")
    _import_modules(config.get("modules", []))
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


def _import_modules(modules: Any) -> None:
    """Import the configured modules, so that their register() lines run."""
    if isinstance(modules, str) or not all(isinstance(m, str) for m in modules):
        raise ValueError(f"analysis modules must be a list of module names, got {modules!r}")
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"analysis module {module!r} cannot be imported: {exc}") from None
