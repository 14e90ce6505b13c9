"""How a run of a scan ended, as a producer learns it from control, and so what becomes of what the
writer has not committed of it: spilled (a replay can complete the file), or dropped; and which
blocks of scans closed without it a producer that has just started should spill."""

from __future__ import annotations

from stemstream.core.scan_spec import ScanSpec, SpecError


class ScanStopped(Exception):
    """This run of a scan is over for the producer: control ended it, or the pipeline is shutting
    down. ``keep``: spill what the writer has not committed; ``whole``: the scan was closed with
    every frame (nothing to say)."""

    def __init__(self, why: str, keep: bool, whole: bool = False):
        super().__init__(why)
        self.why = why
        self.keep = keep
        self.whole = whole


def how_it_ended(reply: dict, epoch: int, shutting_down: bool) -> ScanStopped | None:
    """What control's ``get_scan`` reply says of run ``epoch`` of the scan (None: it still runs,
    and no shutdown came). Closed with every frame: nothing to keep. Closed with frames missing:
    keep (the file is there to complete). Failed: the writer kept nothing of it (the scan is
    streamed again from its source), so nothing to keep, except at a shutdown (the writer closes
    its files on the way out). Whatever control cannot say: keep."""
    try:
        run = ScanSpec.from_wire(reply.get("scan")) if reply.get("ok") else None
    except SpecError:
        run = None
    if run is not None and run.epoch != epoch:  # a later run started: control may know how this one ended
        return _earlier_run_ended(reply.get("earlier_runs"), epoch)
    if run is None:
        return ScanStopped("control cannot say how this run of it ended", keep=True)
    summary = reply.get("summary") if isinstance(reply.get("summary"), dict) else {}
    state = reply.get("state")
    if state == "running":
        return ScanStopped("the pipeline is shutting down", keep=True) if shutting_down else None
    if state == "failed":
        return ScanStopped(f"it failed ({summary.get('error', 'no reason given')})", keep=shutting_down)
    ledger = summary.get("ledger")
    expected = ledger.get("frames_expected") if isinstance(ledger, dict) else None
    whole = expected is not None and ledger.get("frames_complete") == expected
    return ScanStopped("it was closed" + ("" if whole else " with frames missing"), keep=not whole, whole=whole)


def _earlier_run_ended(earlier_runs, epoch: int) -> ScanStopped:
    """How run ``epoch`` ended, from the outcomes control keeps of the earlier runs of a scan
    number (ScanState.earlier_runs): what the writer closed with every frame needs nothing kept;
    anything else, or a run control no longer remembers, is kept."""
    outcome = earlier_runs.get(str(epoch)) if isinstance(earlier_runs, dict) else None
    if outcome == "whole":
        return ScanStopped("it was closed", keep=False, whole=True)
    if outcome == "failed":
        return ScanStopped("it failed", keep=False)
    return ScanStopped(f"a later run of it started ({outcome or 'how this one ended is not known'})", keep=True)


def missed_blocks(reply: dict) -> list[tuple[ScanSpec, set[int]]]:
    """The scans and blocks of control's ``missed_blocks`` reply: scans closed lately whose file
    holds frames of those blocks without the asking producer's module. A producer that did not
    stream them (killed, and started again after its node groups counted its blocks without it;
    a scan control ended is never streamed) spills its part of them from its source, beside the
    node groups' spill of the other parts. Anything malformed in the reply is left out."""
    found = []
    for item in reply.get("scans", []) if reply.get("ok") and isinstance(reply.get("scans"), list) else []:
        try:
            found.append((ScanSpec.from_wire(item.get("scan")), {int(b) for b in item.get("blocks")}))
        except (SpecError, AttributeError, TypeError, ValueError):
            continue
    return found
