"""Analysis results in a counted file: ``/analysis/<analysis>/<result>`` datasets, parameters as
attributes of ``/analysis/<analysis>``.

stempy's ``/electron_events`` and ``/metadata`` are not touched, so stempy still loads the file.
The writer stores results at the end of a streamed scan, ``stemstream analyze`` after an offline
run; the dashboard and ``stemstream show`` read them back (:mod:`.stored`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import h5py
import numpy as np

from stemstream.analysis.interface import Analysis
from stemstream.core.version import SOFTWARE_VERSION

ANALYSIS_GROUP = "analysis"


def store_results(
    target: str | os.PathLike | h5py.Group,
    analyses: Iterable[Analysis],
    results: Mapping[str, Mapping[str, np.ndarray]],
    *,
    info: Mapping[str, Any] | None = None,
) -> None:
    """Write results into ``/analysis/<name>/<result>`` of a counted file (a path, opened 'r+',
    or an open h5py File / Group to write under). Each analysis group gets its parameters as
    attributes (plus ``params_json``, the exact dict), each dataset its description; ``/analysis``
    gets the software version, the time and ``info`` (frames, events, source...). An analysis
    group that exists is replaced; other analyses' groups are kept."""
    if isinstance(target, h5py.Group):
        _store(target, analyses, results, info)
        return
    with h5py.File(target, "r+") as f:
        _store(f, analyses, results, info)


def load_results(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """The results stored in a counted file: {analysis: {result: array}} ({} if there are none)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(path, "r") as f:
        group = f.get(ANALYSIS_GROUP)
        if not isinstance(group, h5py.Group):
            return out
        for name, g in group.items():
            if isinstance(g, h5py.Group):
                out[name] = {k: d[()] for k, d in g.items() if isinstance(d, h5py.Dataset)}
    return out


def _store(root: h5py.Group, analyses: Iterable[Analysis], results, info: Mapping[str, Any] | None) -> None:
    group = root.require_group(ANALYSIS_GROUP)
    group.attrs["software_version"] = SOFTWARE_VERSION
    group.attrs["created_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
    for key, value in (info or {}).items():
        if value is not None:
            group.attrs[key] = _attr(value)
    for a in analyses:
        if a.name in group:
            del group[a.name]
        _store_analysis(group.create_group(a.name), a, results[a.name])


def _store_analysis(g: h5py.Group, a: Analysis, res: Mapping[str, np.ndarray]) -> None:
    """One analysis's parameters and results into its (new, empty) group."""
    g.attrs["analysis"] = f"{type(a).__module__}.{type(a).__qualname__}"
    g.attrs["params_json"] = json.dumps(a.params)
    for key, value in a.params.items():
        if value is not None:
            g.attrs[key] = _attr(value)
    extra = a.result_attrs(res)
    for key, value in res.items():
        # Not compressed: gzip (level 1) took 0.9 s of CPU for a 1024 x 1024 scan's results, in
        # the writer's close, to save 23 MB of a 2.5 GB file (measured 2026-12-04).
        ds = g.create_dataset(key, data=np.asarray(value))
        if key in a.descriptions:
            ds.attrs["description"] = a.descriptions[key]
        for k, v in extra.get(key, {}).items():
            if v is not None:
                ds.attrs[k] = _attr(v)


def _attr(value: Any) -> Any:
    """A parameter as an HDF5 attribute: numbers, bools, strings as they are; flat numeric lists as
    arrays; anything else (dicts, nested or mixed lists) as a JSON string."""
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, float, np.number, str)):
        return value
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value
    ):
        return np.asarray(value)
    return json.dumps(value)
