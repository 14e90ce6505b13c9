"""What every command shares: user errors as one sentence, the config, shape parsing, progress,
Ctrl-C, logging."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from stemstream.cli.reports import frames_counted

if TYPE_CHECKING:
    from stemstream.core.config import PipelineConfig

# The commands' terminal (stdout); errors go to stderr.
console = Console()

ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="Pipeline config (TOML); default: everything on localhost.")]


class UserError(Exception):
    """Bad input from the user: reported as one sentence, exit code 2."""


def _known_input_errors() -> tuple[type[BaseException], ...]:
    from stemstream.counting.thresholds import CalibrationError
    from stemstream.formats.raw import RawFormatError
    from stemstream.formats.reference_images import ReferenceImageError
    from stemstream.formats.sparse_h5 import CountedFileError

    return (UserError, RawFormatError, ReferenceImageError, CountedFileError, CalibrationError)


def run_guarded(job: Callable[[], None]) -> None:
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


def guarded(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` run by :func:`run_guarded` (typer reads the options from ``command``'s
    signature, which the wrapper keeps)."""

    @functools.wraps(command)
    def run_command(*args, **kwargs) -> None:
        run_guarded(functools.partial(command, *args, **kwargs))

    return run_command


def read_config(path: Path | None) -> PipelineConfig:
    """The pipeline config in ``path`` (None: the defaults), checked; UserError if it is not usable."""
    from stemstream.core.config import ConfigError
    from stemstream.deploy.settings import load_settings

    try:
        return load_settings(path)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def validated(config: PipelineConfig) -> PipelineConfig:
    """``config`` after options changed it, checked again; UserError if it is not usable now."""
    from stemstream.core.config import ConfigError

    try:
        return config.validate()
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def parse_shape(text: str, option: str) -> tuple[int, int]:
    """Parse ``ROWSxCOLS`` (e.g. ``128x256``) into (rows, cols). Raises UserError."""
    from stemstream.core.scan_spec import SpecError, parse_scan_shape

    try:
        return parse_scan_shape(text, option)
    except SpecError as exc:
        raise UserError(str(exc)) from None


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


@contextlib.contextmanager
def scan_progress(number: int, frames: int, status: dict) -> Iterator[Callable[[dict], None]]:
    """A progress bar of scan ``number`` (``frames`` frames); yields the ``progress(status)`` that
    starting a scan takes: frames the node groups counted since control's ``status`` now."""
    before = frames_counted(status)
    with progress_bar(console, f"scan {number}", frames) as advance:
        yield lambda status: advance(min(frames_counted(status) - before, frames))


class Killed(Exception):
    """A second Ctrl-C: the command's processes were killed at once."""


@contextlib.contextmanager
def interrupts(kill: Callable[[], None]) -> Iterator[None]:
    """Within the block, the first Ctrl-C (SIGINT, or a SIGTERM) raises KeyboardInterrupt, for the
    command to stop its processes cleanly; the second calls ``kill`` at once (from the signal
    handler: it must not wait for anything) and raises :class:`Killed`; any later one only kills."""
    received = 0

    def handler(signum, frame) -> None:
        nonlocal received
        received += 1
        if received == 1:
            raise KeyboardInterrupt
        kill()
        if received == 2:
            raise Killed

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def compiling_notice(message: str) -> Iterator[Callable[[], None]]:
    """Yields ``show()``: the first call shows ``message`` with a spinner (a plain line when
    stdout is not a terminal) until the block ends; without a call nothing is shown."""
    shown: list = []
    once = threading.Lock()  # called from the compiling threads: shown once

    def show() -> None:
        with once:
            if shown:
                return
            if console.is_terminal:
                shown.append(console.status(message))
                shown[0].start()
            else:
                shown.append(None)
                console.print(message)

    try:
        yield show
    finally:
        if shown and shown[0] is not None:
            shown[0].stop()


def setup_logging(verbose: bool = False) -> None:
    """Quiet structured logs on stderr: warnings by default, debug with --verbose."""
    level = logging.DEBUG if verbose else logging.WARNING
    handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
    logging.basicConfig(level=level, format="%(name)s: %(message)s", handlers=[handler], force=True)
    logging.getLogger("stemstream").setLevel(level)
