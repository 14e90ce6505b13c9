"""Commands that show results: ``serve`` (the web dashboard), ``analyze`` and ``show`` (images of a
counted file, and its ledger, as PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stemstream.cli.support import UserError, console, guarded, read_config


def _counted_file(path: Path) -> dict:
    from stemstream.analysis.stored import file_facts

    return file_facts(path)  # CountedFileError (one sentence) for anything else


def _out_dir(out: Path | None, file: Path) -> Path:
    target = out if out is not None else file.resolve().parent
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output directory {target}: {exc.strerror or exc}") from None
    return target


@guarded
def serve(
    config: Annotated[Optional[Path], typer.Option("--config", help="Pipeline config (TOML): where control is, the output directory.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (reads need the token unless it is loopback).")] = "127.0.0.1",
    port: Annotated[Optional[int], typer.Option("--port", help="HTTP port (default: [network] dashboard_port, 8000).")] = None,
    catalog: Annotated[Optional[str], typer.Option("--catalog", help="Catalog database: a SQLAlchemy URL or an SQLite file (default: OUTPUT_DIR/catalog.db).")] = None,
    token: Annotated[Optional[str], typer.Option("--token", help="Token for starting scans and removing entries (default: $STEMSTREAM_TOKEN, else a random one, printed).")] = None,
    public_read: Annotated[bool, typer.Option("--public-read", help="Let anyone who reaches the address read, even off loopback.")] = False,
    exit_on_shutdown: Annotated[bool, typer.Option("--exit-on-shutdown", hidden=True, help="Stop when control shuts the pipeline down (the launcher's dashboard).")] = False,
) -> None:
    """Serve the web dashboard: the live scan, node-group health, the catalog of past scans."""
    from stemstream.web.catalog import CatalogError, catalog_url
    from stemstream.web.server import resolve_token, serve as run_server

    cfg = read_config(config)
    chosen = cfg.network.dashboard_port if port is None else port
    if not 1 <= chosen <= 65535:
        raise UserError(f"--port must be 1 to 65535, got {chosen}")
    secret, generated = resolve_token(token)
    url = catalog_url(catalog, cfg.pipeline.output_dir)

    def announce(address: str, open_reads: bool) -> None:
        """Called by the server once it listens at ``address``."""
        console.print(f"dashboard: [bold]{address}[/]  (catalog {url.split('://', 1)[0]}, "
                      f"control {cfg.network.control()})", highlight=False, soft_wrap=True)
        if generated:
            console.print(f"token for starting scans and removing catalog entries: {secret}",
                          highlight=False, soft_wrap=True)
        if not open_reads:
            console.print(f"not on loopback: reading needs the token too ({address}?token=...)", highlight=False)

    try:
        run_server(cfg, host, chosen, url, secret, public_read=public_read,
                   exit_on_shutdown=exit_on_shutdown, announce=announce)
    except CatalogError as exc:
        raise UserError(str(exc)) from None


@guarded
def analyze(
    file: Annotated[Path, typer.Argument(help="A counted file (stempy sparse HDF5).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Directory for the PNGs (default: beside the file).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="Config whose [analysis] section says what to run.")] = None,
    store: Annotated[bool, typer.Option("--store/--no-store", help="Store the results in the file under /analysis.")] = True,
) -> None:
    """Run the analyses (virtual detectors, summed pattern, CoM/DPC) over a counted file."""
    from stemstream.analysis.offline import analyze_counted_file

    _counted_file(file)
    analysis = read_config(config).analysis if config is not None else None
    out_dir = _out_dir(output, file)
    try:
        result = analyze_counted_file(file, out_dir=out_dir, config=analysis, write=store)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    console.print(f"analysed {result.frames:,} frames, {result.events:,} electrons in {result.seconds:.2f} s",
                  highlight=False)
    if store:
        console.print(f"results stored in {file} under /analysis", highlight=False, soft_wrap=True)
    for p in result.pngs:
        console.print(f"  {p}", highlight=False, soft_wrap=True)


@guarded
def show(
    file: Annotated[Path, typer.Argument(help="A counted file (stempy sparse HDF5).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Directory for the PNGs (default: beside the file).")] = None,
) -> None:
    """Render a scan's images (and its ledger) to PNG files, and say where they are."""
    from stemstream.analysis.figures import render_scan

    facts = _counted_file(file)
    out_dir = _out_dir(output, file)
    written, computed = render_scan(file, out_dir, facts)
    if computed:
        console.print(f"{file.name} holds no /analysis results: computed them now "
                      f"(`stemstream analyze {file}` stores them in the file)", highlight=False, soft_wrap=True)
    console.print(f"wrote {len(written)} PNG files to {out_dir}:", highlight=False, soft_wrap=True)
    for p in written:
        console.print(f"  {p}", highlight=False, soft_wrap=True)
