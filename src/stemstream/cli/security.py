"""``stemstream keys``: CURVE key pairs for encrypted, authenticated links between sites."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stemstream.cli.support import UserError, console, guarded


@guarded
def keys(
    keys_dir: Annotated[Path, typer.Argument(help="Directory for the keys (created); [security] keys_dir.")],
    name: Annotated[Optional[list[str]], typer.Option(
        "--name", help="Create this client key pair (repeatable) and authorise it, instead of server + client.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing key pairs of the same names.")] = False,
) -> None:
    """Create CURVE key pairs: the servers' (server.key) and the clients' (client.key), the
    clients' public key authorised in KEYS_DIR/authorized. Then set [security] curve = true and
    keys_dir in the pipeline config."""
    from stemstream.core.config import ConfigError
    from stemstream.transport.curve import create_keys

    try:
        written = create_keys(keys_dir, names=list(name) if name else None, force=force)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    for path in written:
        kind = "secret, keep private" if path.suffix == ".key_secret" else (
            "authorised" if path.parent.name == "authorized" else "public")
        console.print(f"{path}  ({kind})")
    console.print(f"Set [bold]\\[security] curve = true[/] and [bold]keys_dir = \"{keys_dir.resolve()}\"[/] in the "
                  "pipeline config; copy the directory to every host (server.key_secret only where control, "
                  "the gateway, node groups or the writer run).", highlight=False)
