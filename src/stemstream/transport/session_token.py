"""The session token: without CURVE, what tells control that a request comes from this pipeline's
own roles and commands rather than from anyone who can reach its port.

Control makes a random token when it starts (or takes the one an earlier control of the same
config made) and keeps it in a file only its user can read: ``[security] token_file``, by default
beside ``[pipeline] state_file`` (``x.state`` -> ``x.token``). Every client made from the config
(the roles, ``stemstream scan``, the local launcher, the dashboard) reads that file and sends the
token with its requests; control acts on a request that changes something only when the token
matches (pipeline.control.fields says which requests only read). With ``[security] curve = true``
the link itself is authenticated (transport.curve) and no token is used. Roles on other hosts need
the same file at the same path (a shared file system, or a copy), or CURVE.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# The request field that carries the token, and the reply field that marks a refusal for want of it.
TOKEN_FIELD = "token"
REFUSED_FIELD = "unauthenticated"
_DEFAULT_NAME = "stemstream-control.token"


def token_path(config) -> Path:
    """Where the session token of ``config``'s pipeline is kept."""
    if config.security.token_file:
        return Path(config.security.token_file)
    state = config.pipeline.state_file
    return Path(state).with_suffix(".token") if state else Path(_DEFAULT_NAME)


def new_token() -> str:
    return secrets.token_hex(16)


def read_token(path: Path) -> str | None:
    """The token in ``path``; None when there is none to read (not written yet, unreadable)."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token or None


def ensure_token(path: Path) -> str:
    """Control's token: the one already in ``path``, else a new one written there (mode 0600,
    created whole or not at all, so two controls started at once agree on one). OSError when the
    file can be neither read nor written."""
    token = read_token(path)
    if token is None:
        token = new_token()
        fd, tmp = tempfile.mkstemp(prefix=".token-", dir=path.parent)  # mode 0600
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        try:
            os.link(tmp, path)  # fails if another control wrote one meanwhile: take that one
        except FileExistsError:
            existing = read_token(path)
            if existing is None:  # an empty file: replace it
                os.replace(tmp, path)
            token = existing or token
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        log.warning("the session token file %s was readable by others; made it readable by its owner only", path)
        os.chmod(path, 0o600)
    return token


def matches(given, token: str) -> bool:
    """True when ``given`` (a request's field, any type) is ``token``, compared in constant time."""
    return isinstance(given, str) and hmac.compare_digest(given.encode(), token.encode())
