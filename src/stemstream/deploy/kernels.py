"""Compiling the roles' kernels once, before the roles start.

Every role that counts or simulates runs numba kernels, compiled on first use and cached on disk
(``cache=True``). On a fresh install the first ``run``/``demo`` would have each of its processes
(2 node groups, 4 producers, the writer) compile the same kernels at once on the same cores: over
a minute of CPU on a 2-core laptop, during which the roles cannot check in with control. Compiling
them here first (each kernel once, two processes sharing the kernels) fills numba's cache; the roles then load it in a second or two,
and no scan's time (nor the rate its summary gives) includes compiling. On later runs this loads
the cache too (about a second).
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from numba.core import event

from stemstream.analysis import default_analyses
from stemstream.core.config import PipelineConfig
from stemstream.core.detector import FRAME_SHAPE
from stemstream.deploy.sources import ProducerSource
from stemstream.pipeline.node.role import load_kernels
from stemstream.pipeline.writer.role import load_writer_kernels


def compile_kernels(config: PipelineConfig, source: ProducerSource,
                    on_compile: Callable[[], None] | None = None) -> None:
    """Compile (or load from the cache) what the node groups, the writer and, when the producers
    simulate, the simulator run. ``on_compile`` is called once, when numba starts compiling a
    kernel its cache does not hold (never when everything loads from the cache), so that the
    caller can say why this takes a while.

    Two processes share the work (CPU seconds measured cold on 2 cores: counting on sectors
    11-13, analyses 3-5, writer 1.5, simulator 20-23): this one the node groups' and the writer's
    kernels, a second one the simulator's, so the first run's wait on a fresh install is about
    the longer half. Whatever the second process could not do (it died, it could not start) the
    roles compile themselves."""
    started = _start_compiling(_simulator_kernels, source) if not source.replay else None
    compiling = started[1] if started is not None else None
    with first_compile(on_compile), _told_when(compiling, on_compile):
        analyses = default_analyses(FRAME_SHAPE, config.analysis)
        load_kernels(analyses, config.counting.method)
        load_writer_kernels(analyses)
        if started is not None:
            started[0].join()


def _simulator_kernels(source: ProducerSource, compiling) -> None:
    """In the second process: the simulator's kernels; ``compiling`` is set when numba compiles
    one."""
    from stemstream.sources.simulator import DetectorSimulator, SimulationConfig

    with first_compile(compiling.set):
        simulator = DetectorSimulator(SimulationConfig(scan_shape=(1, 2), dose=source.dose, seed=source.seed))
        simulator.records(0, 2, 0)


def _start_compiling(target, source: ProducerSource):
    """(process, event) of ``target(source, event)`` in a child process; None if none can start.
    Forked where the platform allows (no second import of numba), before this process compiles
    anything or starts a thread."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    compiling = context.Event()
    process = context.Process(target=target, args=(source, compiling), name="stemstream-compile", daemon=True)
    try:
        process.start()
    except OSError:
        return None
    return process, compiling


@contextmanager
def _told_when(compiling, callback: Callable[[], None] | None) -> Iterator[None]:
    """Within the block, ``callback()`` when the child process sets ``compiling`` (at most once
    with first_compile's own call: the callback must be idempotent, as compiling_notice's is)."""
    if compiling is None or callback is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if compiling.wait(0.1):
                callback()
                return

    watcher = threading.Thread(target=watch, name="compile-notice", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


@contextmanager
def first_compile(callback: Callable[[], None] | None) -> Iterator[None]:
    """Within the block, ``callback()`` once at the first kernel numba compiles (a cache miss;
    loading a cached kernel is not compiling). numba announces each compilation as a
    ``numba:compile`` event, only after its cache had no entry for the signature."""
    if callback is None:
        yield
        return
    listener = _FirstCompile(callback)
    with event.install_listener("numba:compile", listener):
        yield


class _FirstCompile(event.Listener):
    def __init__(self, callback: Callable[[], None]):
        self.callback = callback
        self.fired = False

    def on_start(self, ev: event.Event) -> None:
        if not self.fired:
            self.fired = True
            self.callback()

    def on_end(self, ev: event.Event) -> None:
        pass
