"""One-screen summaries of a job, for the terminal (rich renderables), and the two facts of a
streamed scan that the commands read from control: its progress, and whether it is complete."""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from stemstream.core.detector import N_MODULES
from stemstream.formats.ledger import ScanLedger


def frames_counted(status: dict) -> int:
    """Frames the node groups have counted, all scans together, by control's ``status``."""
    return sum(r["stats"].get("counters", {}).get("frames_counted", 0)
               for k, r in status["roles"].items() if k.startswith("node"))


def accounted(ledger: dict) -> bool:
    """Whether a streamed scan's ledger (the writer's summary) has every frame complete and no
    sector rejected."""
    return (ledger.get("frames_complete", -1) == ledger.get("frames_expected")
            and ledger.get("frames_incomplete", 1) == 0
            and sum(ledger.get("sectors_rejected", [1])) == 0)


def ledger_table(ledger: ScanLedger) -> Table:
    """Frames and per-module sector counters of a scan, narrow enough for an 80-column terminal."""
    table = Table(show_header=True, header_style="bold", title="ledger", title_justify="left")
    table.add_column("")
    table.add_column("frames", justify="right")
    for m in range(N_MODULES):
        table.add_column(f"module {m}", justify="right")
    frame_rows = [
        ("expected", ledger.frames_expected),
        ("complete", ledger.frames_complete),
        ("incomplete", ledger.frames_incomplete),
        ("missing", ledger.frames_missing),
    ]
    sector_rows = [
        ("sectors received", ledger.sectors_received),
        ("sectors missing", ledger.sectors_missing),
        ("duplicates", ledger.sectors_duplicate),
        ("rejected", ledger.sectors_rejected),
    ]
    for name, value in frame_rows:
        table.add_row(name, f"{value:,}", *[""] * N_MODULES)
    if ledger.frames_over_capacity:
        table.add_row("over capacity", f"{ledger.frames_over_capacity:,}", *[""] * N_MODULES)
    table.add_section()
    for name, values in sector_rows:
        table.add_row(name, "", *[f"{v:,}" for v in values])
    if ledger.rejected_reasons:
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(ledger.rejected_reasons.items()))
        table.caption = f"rejected: {reasons}"
    return table


def count_summary(result) -> Panel:
    """The summary screen of ``stemstream count`` (a CountResult)."""
    ledger = result.ledger
    t = result.thresholds
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    rows, cols = ledger.scan_shape
    facts.add_row("scan", f"{ledger.scan_number} ({rows} rows x {cols} cols, {ledger.frames_per_position} frame(s) per position)")
    mode = "calibrated" if t.calculated else "fixed"
    facts.add_row("thresholds", f"background {t.background:.2f} ADU, X-ray {t.xray:.1f} ADU ({mode})")
    per_frame = result.n_events / ledger.frames_received if ledger.frames_received else 0.0
    facts.add_row("events", f"{result.n_events:,} ({per_frame:.1f} per frame)")
    facts.add_row("time", f"{result.seconds:.2f} s ({result.frames_per_second:,.0f} frames/s; calibration {result.seconds_calibrating:.2f} s)")
    facts.add_row("output", str(result.output))
    status = "[green]every frame accounted for[/]" if ledger.all_accounted else "[yellow]scan incomplete: see the ledger[/]"
    facts.add_row("status", status)
    return Panel(Group(facts, ledger_table(ledger)), title="stemstream count", expand=False)


def simulation_summary(summary, config) -> Panel:
    """The summary screen of ``stemstream simulate`` (a SimulationSummary)."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    rows, cols = config.scan_shape
    facts.add_row("scan", f"{config.scan_number} ({rows} rows x {cols} cols, {config.frames_per_position} frame(s) per position)")
    facts.add_row("frames", f"{summary.n_frames:,} at dose {config.dose:g} electrons/pixel/frame (seed {config.seed})")
    facts.add_row("sectors", f"{summary.n_sectors_written:,} written, {summary.n_sectors_dropped:,} dropped")
    facts.add_row("files", f"{len(summary.paths)} raw files in {summary.out_dir}")
    facts.add_row("time", f"{summary.seconds:.2f} s")
    return Panel(facts, title="stemstream simulate", expand=False)


def stream_summary(summary: dict, status: dict, title: str = "stemstream run") -> Panel:
    """The summary screen of one streamed scan (the writer's summary and control's status)."""
    if "ledger" not in summary:
        return Panel(f"[red]scan {summary.get('scan')} failed: {summary.get('error', 'unknown error')}[/]",
                     title=title, expand=False)
    ledger = ScanLedger.from_dict(summary["ledger"])
    extra = summary["ledger"]
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    rows, cols = ledger.scan_shape
    facts.add_row("scan", f"{ledger.scan_number} ({rows} rows x {cols} cols, {ledger.frames_per_position} frame(s) per position)")
    t = summary.get("thresholds") or {}
    if t:
        mode = "calibrated" if t.get("calculated") else "fixed"
        facts.add_row("thresholds", f"background {t['background']:.2f} ADU, X-ray {t['xray']:.1f} ADU ({mode})")
    per_frame = summary["events"] / ledger.frames_received if ledger.frames_received else 0.0
    facts.add_row("events", f"{summary['events']:,} ({per_frame:.1f} per frame)")
    facts.add_row("time", f"{summary['seconds']:.2f} s from scan start to file closed "
                          f"({summary['frames_per_second']:,.0f} frames/s)")
    lost = sum(extra.get("sectors_lost", []))
    spilled = extra.get("frames_spilled", 0)
    if lost or spilled or extra.get("node_groups_missing"):
        facts.add_row("[yellow]attention[/]", f"sectors lost in transit {lost:,}, frames spilled {spilled:,}, "
                                              f"node groups silent {extra.get('node_groups_missing', [])}")
    facts.add_row("output", summary["path"])
    if summary.get("images"):
        facts.add_row("images", f"{len(summary['images'])} PNG images beside it (virtual BF/ADF, CoM, DPC, summed pattern)")
    roles = Table(title="roles", title_justify="left", show_header=True, header_style="bold")
    roles.add_column("role")
    roles.add_column("peak RSS", justify="right")
    roles.add_column("of it private", justify="right")  # the rest: shared-memory blocks
    roles.add_column("CPU", justify="right")
    roles.add_column("rejected", justify="right")
    for key, role in sorted(status.get("roles", {}).items()):
        stats = role.get("stats", {})
        private = stats.get("peak_private", stats.get("peak_rss", 0))
        roles.add_row(key, f"{stats.get('peak_rss', 0) / 2**20:,.0f} MiB", f"{private / 2**20:,.0f} MiB",
                      f"{stats.get('cpu_s', 0):.1f} s", f"{sum(stats.get('rejected', {}).values()):,}")
    complete = accounted(summary["ledger"])
    facts.add_row("status", "[green]every frame accounted for[/]" if complete else "[yellow]scan incomplete: see the ledger[/]")
    return Panel(Group(facts, ledger_table(ledger), roles), title=title, expand=False)
