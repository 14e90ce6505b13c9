"""``/metadata`` of a counted file: nested groups of attributes, as plain dicts in memory.

stempy's electron-counting thresholds live in ``/metadata/electron_counting`` (names in
:data:`ELECTRON_COUNTING_ATTRS`), ours in ``/metadata/stemstream``. A dict value is a sub-group;
every other value is an attribute, except arrays too big for an attribute, which become datasets.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

#: stempy's names for the electron-counting thresholds, stored in /metadata/electron_counting.
ELECTRON_COUNTING_ATTRS = (
    "threshold_calculated",
    "background_threshold",
    "x_ray_threshold",
    "number_of_samples",
    "min_sample",
    "max_sample",
    "mean",
    "variance",
    "std_dev",
    "number_of_bins",
    "x_ray_threshold_n_sigma",
    "background_threshold_n_sigma",
    "optimized_mean",
    "optimized_std_dev",
)

# HDF5 keeps attributes in the object header, limited to 64 KiB in the default (oldest) file
# format; bigger metadata arrays (e.g. the ledger mask of a 1024 x 1024 scan) become datasets.
MAX_ATTR_BYTES = 32 * 1024


def _normalize_value(key: str, value: Any) -> Any:
    """A metadata value as something h5py can store (checked when set, so errors surface early)."""
    if isinstance(value, Mapping):
        return normalize_metadata(value)
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, float, complex, np.number)):
        return value
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, (np.ndarray, list, tuple)):
        arr = np.asarray(value)
        if arr.dtype.kind in "US" or (arr.dtype.kind == "O" and all(isinstance(x, str) for x in arr.flat)):
            # numpy's fixed-width unicode has no HDF5 equivalent: store variable-length strings
            return np.array([str(x) for x in arr.flat], dtype=object).reshape(arr.shape)
        if arr.dtype.kind in "biufc":
            return arr
    raise TypeError(f"metadata value {key!r} has unsupported type {type(value).__name__}")


def normalize_metadata(attrs: Mapping) -> dict:
    """``attrs`` as a tree h5py can store; None values are left out. Raises TypeError for a value
    of an unsupported type and ValueError for a key that is empty or holds '/'."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if value is None:  # "not known": leave it out rather than invent a placeholder
            continue
        key = str(key)
        if not key or "/" in key:
            raise ValueError(f"metadata key {key!r} must be non-empty and contain no '/'")
        out[key] = _normalize_value(key, value)
    return out


def deep_update(target: dict, source: Mapping) -> None:
    """Merge ``source`` into ``target``: sub-dicts merge, every other value replaces."""
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_update(target[key], value)
        else:
            target[key] = value


def write_metadata(group: h5py.Group, tree: Mapping) -> None:
    """Write a normalized tree under ``group``."""
    for key, value in tree.items():
        if isinstance(value, dict):
            write_metadata(group.require_group(key), value)
        elif isinstance(value, np.ndarray) and value.dtype == object:
            group.attrs.create(key, value, dtype=h5py.string_dtype())
        elif isinstance(value, np.ndarray) and value.nbytes > MAX_ATTR_BYTES:
            group.create_dataset(key, data=value, compression="gzip", compression_opts=1)
        else:
            group.attrs[key] = value


def _plain(value: Any) -> Any:
    """Attribute values as plain Python where that is lossless (numpy scalars, bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_metadata(group: h5py.Group) -> dict:
    """The tree under ``group``: attributes and datasets as values, sub-groups as dicts."""
    out: dict[str, Any] = {key: _plain(value) for key, value in group.attrs.items()}
    for key, item in group.items():
        if isinstance(item, h5py.Group):
            out[key] = read_metadata(item)
        elif isinstance(item, h5py.Dataset):
            out[key] = item[()]
    return out
