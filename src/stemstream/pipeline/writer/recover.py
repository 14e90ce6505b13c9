"""``stemstream recover``: a scan's counted file made from the journal of a writer that died after
the rest of its pipeline was gone (a second Ctrl-C while it closed the file, the host lost).

Such a writer leaves ``NAME.h5.partial`` (HDF5 is not safe against a process dying in a write:
worth nothing) and ``NAME.h5.journal``, every block it had committed (pipeline.writer.journal).
Recovery is what a writer restarted for that scan does, through the same code: a
:class:`~stemstream.pipeline.writer.scan.WriterScan` of the spec the journal's first record holds
replays the journal into a new file, and is closed as a scan that lacks frames is (the
``.incomplete.h5`` name, its ledger naming what is missing; the whole name if nothing is).

Nothing is deleted unless the new file is in place: the dead writer's ``.partial`` is moved aside
(``NAME.h5.partial.recovering``) while the new one is written, put back if that fails, and
removed with the journal once the file is renamed into place. A journal that a live writer still
uses (HDF5 keeps its partial file locked while it is open), whose scan's file is already there
whole or finished by that run, or that cannot be read is refused with one sentence.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stemstream.analysis import Analysis
from stemstream.core.config import FlowSettings
from stemstream.core.scan_spec import ScanSpec, SpecError
from stemstream.formats.sparse_h5.layout import partial_path
from stemstream.pipeline.writer.files import existing_file, run_summary, scan_paths
from stemstream.pipeline.writer.journal import JOURNAL_SUFFIX, JournalError, check_journal, journal_path
from stemstream.pipeline.writer.role import check_free_space
from stemstream.pipeline.writer.scan import ScanHooks, WriterScan

log = logging.getLogger(__name__)

ASIDE_SUFFIX = ".recovering"


class RecoveryError(Exception):
    """A journal not recovered (nothing was deleted); the message is one sentence."""


@dataclass(frozen=True)
class Recovered:
    """A scan's file made from its journal: where it is, its frames (those incomplete among
    them) and the scan's frames it lacks."""

    path: Path
    frames: int
    incomplete: int
    missing: int


def journals_in(target: Path) -> list[Path]:
    """The journals ``target`` names: itself (a ``.journal`` file) or those in it (a directory),
    sorted; RecoveryError when there is none."""
    if target.is_dir():
        found = sorted(p for p in target.glob("*" + JOURNAL_SUFFIX) if p.is_file())
        if not found:
            raise RecoveryError(f"no writer's journal (*{JOURNAL_SUFFIX}) in {target}: nothing to recover")
        return found
    if not target.exists():
        raise RecoveryError(f"{target} does not exist (give an output directory or a {JOURNAL_SUFFIX} file)")
    if not target.name.endswith(JOURNAL_SUFFIX):
        raise RecoveryError(f"{target} is not a directory nor a writer's journal ({JOURNAL_SUFFIX})")
    return [target]


def _spec_of(journal: Path) -> tuple[ScanSpec, bool]:
    """(the scan's spec, whether its file keeps sub-pixel positions) from the journal's first record."""
    try:
        header, _ = check_journal(journal)
    except JournalError as exc:
        raise RecoveryError(str(exc)) from None
    except OSError as exc:
        raise RecoveryError(f"cannot read {journal}: {exc.strerror or exc}") from None
    if "spec" not in header:
        raise RecoveryError(f"{journal} was written by an older stemstream, which did not record the scan's "
                            "spec in it: it cannot be recovered")
    try:
        spec = ScanSpec.from_wire(header["spec"])
    except SpecError as exc:
        raise RecoveryError(f"{journal} is corrupt: {exc}") from None
    if (header.get("scan"), header.get("epoch")) != spec.key:  # (the writer's reading would take it for a stale one)
        raise RecoveryError(f"{journal} is corrupt: its first record names another scan than its spec")
    if journal_path(scan_paths(journal.parent, spec)[0]) != journal:
        raise RecoveryError(f"{journal} is the journal of {spec.file_name}, not of its own name: give it back that name")
    return spec, bool(header.get("subpixel_positions", False))


def _check_target(spec: ScanSpec, output_dir: Path, journal: Path) -> None:
    """RecoveryError when the scan's file is there whole or finished by this run, or a live writer holds it."""
    whole, _ = scan_paths(output_dir, spec)
    there = existing_file(output_dir, spec)
    if there == whole:
        raise RecoveryError(f"{whole} already exists and holds the scan: it is never written over ({journal} "
                            "is left as it is)")
    if there is not None and run_summary(there, spec.number, spec.epoch) is not None:
        raise RecoveryError(f"{there} was finished by the writer of this journal, which died before removing it: "
                            f"{journal} is a leftover, nothing to recover")
    partial = partial_path(whole)
    if _held_open(partial):
        raise RecoveryError(f"a writer still has scan {spec.number}'s file open ({partial.name}): "
                            "it is not orphaned")


def _held_open(partial: Path) -> bool:
    """True while a live process holds ``partial`` open for writing: HDF5 keeps such a file locked (flock)."""
    try:
        fd = os.open(partial, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (and our lock with it)
    return False


def recover(journal: Path, analyses: Sequence[Analysis], flow: FlowSettings) -> Recovered:
    """The counted file of ``journal``'s scan, rebuilt as a writer restarted for that scan would
    (``analyses``: the writer's, from its config); RecoveryError, with nothing deleted, if not."""
    spec, subpixel = _spec_of(journal)
    output_dir = journal.parent
    _check_target(spec, output_dir, journal)
    partial = partial_path(scan_paths(output_dir, spec)[0])
    aside = partial.with_name(partial.name + ASIDE_SUFFIX)
    if partial.exists() and not aside.exists():  # (one there already is the dead writer's, from a recovery cut short)
        os.replace(partial, aside)
    hooks = ScanHooks(latest_spec=lambda: spec, heartbeat=lambda: None, node_heard=lambda node: False,
                      reject=lambda reason, detail: log.warning("%s: %s (%s)", journal, reason, detail),
                      check_space=lambda: check_free_space(output_dir, spec.n_positions))
    scan = None
    try:
        scan = WriterScan(spec, output_dir, analyses, flow, hooks, subpixel_positions=subpixel)
        summary = scan.close()
    except BaseException as exc:  # (a Ctrl-C too: the dead writer's partial goes back)
        if scan is not None:  # never scan.abort(): that deletes the journal
            scan.out.abort()
            scan.journal.close(delete=False)
        if aside.exists():
            os.replace(aside, partial)
        if not isinstance(exc, Exception):
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        if isinstance(exc, FileExistsError):  # another run's file of that name: the writer's rule (pipeline.writer.files)
            raise RecoveryError(f"{reason} ({journal} is left as it is)") from None
        raise RecoveryError(f"{journal} not recovered: {reason}; nothing was deleted") from None
    journal.unlink(missing_ok=True)  # (the scan's close removes it too, in a thread of its own)
    aside.unlink(missing_ok=True)
    ledger = summary["ledger"]
    return Recovered(Path(summary["path"]), int(ledger["frames_received"]), int(ledger["frames_incomplete"]),
                     int(ledger["frames_missing"]))
