"""What counted a scan's frames, as its file says (``/metadata/stemstream``): the counting
method and, for the cluster method, every single-electron model that counted frames in it.

Each EVENTS message says how its frames were counted (wire.encode_events' ``counting``), and the
journal keeps that with the message's events, so the file names the model of every frame it
holds: one from a node group that died before its DONE (its frames were committed, then its
stream failed over), those of a node group's later streams (a node group fits a model per
stream: after a failover, its new stream has another, from other frames), those of a file
rebuilt from the journal, and those of the frames a resume carries over from the file it
completes. Until 2026-12-05 the models came from the DONE messages only, and a
failed-over node group's model was missing from a file that held frames it had counted. (DONE
says it too; a stream that committed no frames counted nothing in the file.)
"""

from __future__ import annotations

import numpy as np

from stemstream.formats.wire import is_attribute_name


class CountingRecord:
    """The counting of a scan's committed frames, noted per (node group, stream)."""

    def __init__(self) -> None:
        self._methods: set[str] = set()
        self._models: dict[tuple[int, int], dict] = {}  # (node group, stream) -> its model's attributes
        self._frames: dict[tuple[int, int], int] = {}  # frames that model counted, committed
        self._carried: dict[str, dict] = {}  # the models of a resumed file's frames, by name (carry)

    def note(self, node: int, stream: int, counting: dict | None, frames: int = 0) -> None:
        """``frames`` frames of ``node``'s ``stream`` committed, counted as ``counting`` says
        (decoded by formats.wire: ``{"method": ..., "model": {...} or None}``; None: not said)."""
        if counting is None:
            return
        self._methods.add(counting["method"])
        if counting.get("model"):
            key = (node, stream)
            self._models.setdefault(key, counting["model"])  # (one model a stream: its first word stands)
            self._frames[key] = self._frames.get(key, 0) + frames

    def carry(self, earlier: dict, frames: int) -> None:
        """A resume carries ``frames`` frames over from the incomplete file it completes, whose
        ``/metadata/stemstream`` is ``earlier``: its methods, and its models, named
        ``epoch_<e>_<their name there>`` (e: that file's epoch), each with the frames it counted
        in that file (all ``frames`` when it had one model)."""
        self._methods.update(m for m in str(earlier.get("counting_method", "")).split("+") if m)
        models = earlier.get("cluster_models")
        models = models if isinstance(models, dict) else {}  # (a file of ours, but read from disk: what is odd is left)
        one = earlier.get("cluster_model")
        if not models and isinstance(one, dict) and one:
            one = dict(one)
            models = {f"node_{_whole(one.pop('node_group', 0))}": {**one, "frames": frames}}
        for name, model in models.items():
            if isinstance(model, dict) and is_attribute_name(name):
                numbers = {k: _number(v) for k, v in model.items() if is_attribute_name(k)}
                self._carried[f"epoch_{_whole(earlier.get('epoch', 0))}_{name}"] = {
                    k: v for k, v in numbers.items() if v is not None}

    def metadata(self) -> dict:
        """``/metadata/stemstream`` attributes: ``counting_method`` (joined by "+" if they
        differed), and for the cluster method ``cluster_model``, as the offline count writes it
        (the lowest node group's first stream's, with ``node_group`` saying which), plus, when
        more than one model counted, ``cluster_models``: each one with the ``frames`` of this file
        it counted, named ``node_<n>`` (its first stream) or ``node_<n>_stream_<s>`` (a later
        one: routing generation s). {} when nothing was said."""
        if not self._methods:
            return {}
        found: dict = {"counting_method": "+".join(sorted(self._methods))}
        every = {**self._carried, **self._each_model()}
        if self._models:
            first = min(self._models)
            found["cluster_model"] = {**self._models[first], "node_group": first[0]}
        elif self._carried:  # (a resume whose replay counted nothing)
            found["cluster_model"] = {k: v for k, v in next(iter(self._carried.values())).items() if k != "frames"}
        if len(every) > 1:
            found["cluster_models"] = every
        return found

    def _each_model(self) -> dict:
        named, first_stream = {}, {}
        for (node, stream), model in sorted(self._models.items()):
            later = first_stream.setdefault(node, stream) != stream
            named[f"node_{node}_stream_{stream}" if later else f"node_{node}"] = {
                **model, "frames": self._frames[(node, stream)]}
        return named


def _number(value) -> int | float | None:
    """A metadata value read back from HDF5 as a Python number (a model holds numbers); None
    for anything else (an array, a string: left out)."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        return value.item() if isinstance(value, np.generic) else value
    return None


def _whole(value) -> int:
    """An epoch or node group number read back from HDF5; 0 when it is not a number."""
    number = _number(value)
    return int(number) if number is not None else 0
