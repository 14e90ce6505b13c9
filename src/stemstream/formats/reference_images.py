"""Dark references and gain maps: one (rows, cols) float image per detector, read from a file.

Accepted: ``.npy`` (NumPy), and HDF5 (``.h5``/``.hdf5``) holding one 2-D dataset, or a dataset
named with ``FILE.h5:/path/in/file``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from stemstream.core.detector import FRAME_SHAPE


class ReferenceImageError(ValueError):
    """A dark reference or gain map that cannot be used."""


def _two_d_datasets(group: h5py.Group) -> list[str]:
    found: list[str] = []
    group.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and obj.ndim == 2 else None)
    return found


def load_reference_image(spec: str | Path, what: str = "reference image", shape: tuple[int, int] = FRAME_SHAPE) -> np.ndarray:
    """Read a (rows, cols) float32 image from ``spec``; ``what`` names it in error messages.

    Raises ReferenceImageError with one sentence for a missing file, an unknown format, a wrong
    shape, or non-finite values.
    """
    text = str(spec)
    left, sep, right = text.rpartition(":")
    path, dataset = (Path(left), right) if sep and right.startswith("/") else (Path(text), "")
    if not path.is_file():
        raise ReferenceImageError(f"{what} file {path} does not exist")
    try:
        if path.suffix == ".npy":
            image = np.load(path, allow_pickle=False)
        elif path.suffix in (".h5", ".hdf5"):
            with h5py.File(path, "r") as f:
                if not dataset:
                    names = _two_d_datasets(f)
                    if len(names) != 1:
                        raise ReferenceImageError(
                            f"{what} file {path} holds {len(names)} 2-D datasets; name one as {path}:/dataset"
                        )
                    dataset = names[0]
                if dataset not in f:
                    raise ReferenceImageError(f"{what} file {path} has no dataset {dataset}")
                image = f[dataset][()]
        else:
            raise ReferenceImageError(f"{what} file {path}: unknown format (use .npy or .h5)")
    except (OSError, ValueError) as exc:
        if isinstance(exc, ReferenceImageError):
            raise
        raise ReferenceImageError(f"{what} file {path} cannot be read ({exc})") from exc
    image = np.asarray(image)
    if image.shape != tuple(shape):
        raise ReferenceImageError(f"{what} in {path} has shape {image.shape}, frames are {tuple(shape)} (rows, cols)")
    if not np.issubdtype(image.dtype, np.number) or not np.isfinite(image).all():
        raise ReferenceImageError(f"{what} in {path} holds non-numeric or non-finite values")
    return image.astype(np.float32)
