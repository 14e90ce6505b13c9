"""What every command shares: user errors as one sentence, shape parsing, progress, logging."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn


class UserError(Exception):
    """Bad input from the user: reported as one sentence, exit code 2."""


def _known_input_errors() -> tuple[type[BaseException], ...]:
    from stemstream.counting.thresholds import CalibrationError
    from stemstream.formats.raw import RawFormatError
    from stemstream.formats.reference_images import ReferenceImageError
    from stemstream.formats.sparse_h5 import CountedFileError

    return (UserError, RawFormatError, ReferenceImageError, CountedFileError, CalibrationError)


def run_guarded(job: Callable[[], None], console: Console) -> None:
    """Run a command's job; bad input and I/O failures end it with one line on stderr."""
    err = Console(stderr=True)
    try:
        job()
    except _known_input_errors() as exc:
        # escape: messages name config sections like "[pipeline]", which are not markup
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        err.print(f"[bold red]error:[/] {escape(str(exc.strerror or exc))}{escape(where)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


_SHAPE = re.compile(r"^\s*(\d+)\s*[xX,]\s*(\d+)\s*$")


def parse_shape(text: str, option: str) -> tuple[int, int]:
    """Parse ``ROWSxCOLS`` (e.g. ``128x256``) into (rows, cols). Raises UserError."""
    match = _SHAPE.match(text)
    if not match:
        raise UserError(f"{option} must look like ROWSxCOLS (e.g. 64x64), got {text!r}")
    rows, cols = int(match.group(1)), int(match.group(2))
    if rows < 1 or cols < 1 or rows > 65535 or cols > 65535:
        raise UserError(f"{option} needs 1 to 65535 rows and columns, got {rows}x{cols}")
    return rows, cols


@contextlib.contextmanager
def progress_bar(console: Console, label: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A progress bar; yields ``advance(done, total=None)`` taking absolute counts."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(label, total=total)

        def advance(done: int, new_total: int | None = None) -> None:
            if new_total is not None:
                progress.update(task, total=new_total)
            progress.update(task, completed=done)

        yield advance


def setup_logging(verbose: bool = False) -> None:
    """Quiet structured logs on stderr: warnings by default, debug with --verbose."""
    level = logging.DEBUG if verbose else logging.WARNING
    handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
    logging.basicConfig(level=level, format="%(name)s: %(message)s", handlers=[handler], force=True)
    logging.getLogger("stemstream").setLevel(level)
