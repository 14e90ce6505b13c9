"""``stemstream recover``: counted files from the journals of writers that died after the rest of
their pipeline was gone (a second Ctrl-C while the file closed, the host lost mid-scan).

Each journal is replayed into its scan's file as a writer restarted for that scan would
(pipeline.writer.recover), with the analyses of the config given; one line per scan says the
file, its frames and what it lacks. A journal that cannot be recovered gets one line, and
nothing of it is deleted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from stemstream.cli.support import ConfigOption, UserError, console, guarded, read_config


@guarded
def recover(
    target: Annotated[Path, typer.Argument(metavar="OUTPUT_DIR_OR_JOURNAL", help="An output directory (every "
                                           "writer's journal in it) or one NAME.h5.journal.")],
    config: ConfigOption = None,
) -> None:
    """Make the counted file of each scan whose writer died and left its journal (the analyses: the config's)."""
    from stemstream.analysis import default_analyses
    from stemstream.core.detector import FRAME_SHAPE
    from stemstream.pipeline.writer.recover import RecoveryError, journals_in

    cfg = read_config(config)
    try:
        journals = journals_in(target)
    except RecoveryError as exc:
        raise UserError(str(exc)) from None
    analyses = default_analyses(FRAME_SHAPE, cfg.analysis)
    writer_log = logging.getLogger("stemstream.pipeline.writer.scan")
    level = writer_log.level
    if writer_log.getEffectiveLevel() > logging.DEBUG:  # its warnings (a journal replayed, no DONE) say what our line says
        writer_log.setLevel(logging.ERROR)
    try:
        recovered = sum(_recover_one(journal, analyses, cfg.flow) for journal in journals)
    finally:
        writer_log.setLevel(level)
    if recovered < len(journals):
        raise typer.Exit(1 if recovered else 2)


def _recover_one(journal: Path, analyses, flow) -> bool:
    """Recover one journal and say so in one line (on stderr if it was refused); True if recovered."""
    from stemstream.pipeline.writer.recover import RecoveryError
    from stemstream.pipeline.writer.recover import recover as recover_journal

    try:
        done = recover_journal(journal, analyses, flow)
    except RecoveryError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return False
    console.print(f"{done.path}: {done.frames:,} frames recovered ({done.incomplete:,} incomplete), "
                  f"{done.missing:,} missing", highlight=False, soft_wrap=True)
    return True
