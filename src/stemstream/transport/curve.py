"""CURVE encryption and authentication of the pipeline's links (ZeroMQ's CurveZMQ).

Switched on by ``[security] curve = true``. Every listening socket (control, the gateway's and
node groups' inputs, the writer's input) is then a CURVE *server* and every connecting socket a
CURVE *client*: traffic is encrypted, and a server accepts only clients whose public key is in the
authorised-keys directory. A refused client is logged (the first few times per key) and counted
in the role's ``connections_refused`` counter; nothing it sends is delivered.

Keys live in ``[security] keys_dir`` (``stemstream keys DIR`` creates them)::

    server.key, server.key_secret   the key pair of the listening sockets (secret needed on hosts
                                    that run control, the gateway, node groups or the writer)
    client.key, client.key_secret   the key pair of the connecting sockets (every host)
    authorized/*.key                public keys allowed to connect (the servers read these)

A site that must not share the client secret gets its own pair (``stemstream keys DIR --name
site-b``, authorised at once) and uses it with ``client_key = "site-b"``; every host needs the
server's *public* key. Names are configurable (``server_key``, ``client_key``,
``authorized_dir``).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections import Counter
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from stemstream.core.config import ConfigError, PipelineConfig, SecuritySettings

log = logging.getLogger(__name__)

# How many refusals per client key are logged (all are counted); a refused client retries its
# handshake every reconnect interval, so logging each one would flood the log.
_LOGGED_REFUSALS_PER_KEY = 3


class CurveKeyError(ConfigError):
    """A key file that is missing or unreadable; one sentence."""


def _key_files(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.key", directory / f"{name}.key_secret"


def authorized_dir(security: SecuritySettings) -> Path:
    return Path(security.authorized_dir) if security.authorized_dir else Path(security.keys_dir) / "authorized"


def create_keys(keys_dir: str | os.PathLike, names: list[str] | None = None, authorize: list[str] | None = None,
                force: bool = False) -> list[Path]:
    """Create CURVE key pairs ``NAME.key`` (public) and ``NAME.key_secret`` (mode 0600) in
    ``keys_dir`` for each name (default: server and client), and copy the public keys of
    ``authorize`` (default: every name but "server") into ``keys_dir/authorized``. Refuses to
    replace an existing pair unless ``force``. Returns the files written."""
    keys_dir = Path(keys_dir)
    names = names or ["server", "client"]
    authorize = [n for n in names if n != "server"] if authorize is None else authorize
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise CurveKeyError(f"a key name must be a plain file name, got {name!r}")
        if not force and any(p.exists() for p in _key_files(keys_dir, name)):
            raise CurveKeyError(f"{keys_dir / name}.key already exists (use --force to replace the key pair)")
    try:
        keys_dir.mkdir(parents=True, exist_ok=True)
        (keys_dir / "authorized").mkdir(exist_ok=True)
    except OSError as exc:
        raise CurveKeyError(f"cannot create the keys directory {keys_dir}: {exc.strerror or exc}") from None
    written = []
    old_umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        for name in names:
            public, secret = (Path(p) for p in zmq.auth.create_certificates(keys_dir, name))
            os.chmod(public, 0o644)
            written += [public, secret]
    finally:
        os.umask(old_umask)
    for name in authorize:
        public = _key_files(keys_dir, name)[0]
        if not public.exists():
            raise CurveKeyError(f"cannot authorise {name}: {public} does not exist")
        target = keys_dir / "authorized" / public.name
        shutil.copyfile(public, target)
        written.append(target)
    return written


def _load(path: Path, what: str, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read the {what} {path} ({exc}); create keys with `stemstream keys`") from None
    if secret and not secret_key:
        raise CurveKeyError(f"{path} holds no secret key")
    return public, secret_key


class _Authenticator(ThreadAuthenticator):
    """ZAP handler of one context: accepts the authorised public keys, logs and counts the rest."""

    def __init__(self, context: zmq.Context, directory: Path):
        super().__init__(context, log=logging.getLogger("stemstream.auth"))
        self.directory = directory
        self.refused: Counter = Counter()  # z85 public key -> refused handshakes
        self._address = ""
        self._keys = self._read()
        self.configure_curve_callback("*", self)

    def _read(self) -> set[bytes]:
        try:
            return set(zmq.auth.load_certificates(self.directory))
        except OSError:
            raise CurveKeyError(f"the authorised keys directory {self.directory} does not exist; "
                                "create keys with `stemstream keys`") from None

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else ""
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        """The credentials provider's check: is this client's public key authorised?"""
        if key in self._keys:
            return True
        self._keys = self._read()  # a key authorised since start is accepted without a restart
        if key in self._keys:
            return True
        self.refused[key] += 1
        if self.refused[key] <= _LOGGED_REFUSALS_PER_KEY:
            log.warning("refused a CURVE connection from %s: client key %s is not among the authorised keys in %s%s",
                        self._address or "an unknown address", key.decode("ascii", "replace"), self.directory,
                        " (further refusals of this key are counted, not logged)"
                        if self.refused[key] == _LOGGED_REFUSALS_PER_KEY else "")
        return False


_authenticators: dict[int, _Authenticator] = {}
_authenticators_lock = threading.Lock()


class Curve:
    """One process's CURVE keys; puts them on sockets. Servers share one authenticator per
    ZeroMQ context, started with the first server socket."""

    def __init__(self, security: SecuritySettings):
        keys_dir = Path(security.keys_dir)
        if not keys_dir.is_dir():
            raise CurveKeyError(f"[security] keys_dir {keys_dir} is not a directory; create keys with `stemstream keys {keys_dir}`")
        self.security = security
        self.keys_dir = keys_dir
        self.authorized = authorized_dir(security)
        server_public, server_secret = _key_files(keys_dir, security.server_key)
        client_public, client_secret = _key_files(keys_dir, security.client_key)
        # The server's public key is needed everywhere; its secret only where servers run.
        self.server_public, _ = _load(server_public, "server public key", secret=False)
        self._server_secret_file = server_secret
        self.client_public, self.client_secret = _load(client_secret, "client secret key", secret=True)
        self._server_secret: bytes | None = None

    def server(self, sock: zmq.Socket) -> zmq.Socket:
        """Make ``sock`` (before it binds) a CURVE server that only authorised clients reach."""
        if self._server_secret is None:
            _, self._server_secret = _load(self._server_secret_file, "server secret key", secret=True)
        self.authenticator(sock.context)
        sock.curve_secretkey = self._server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True
        return sock

    def client(self, sock: zmq.Socket) -> zmq.Socket:
        """Make ``sock`` (before it connects) a CURVE client of the servers."""
        sock.curve_secretkey = self.client_secret
        sock.curve_publickey = self.client_public
        sock.curve_serverkey = self.server_public
        return sock

    def authenticator(self, context: zmq.Context) -> _Authenticator:
        with _authenticators_lock:
            auth = _authenticators.get(id(context))
            if auth is None or auth.context is not context:
                auth = _Authenticator(context, self.authorized)
                auth.start()
                _authenticators[id(context)] = auth
            return auth

    def refused(self, context: zmq.Context) -> int:
        """Connections refused so far by this context's authenticator."""
        auth = _authenticators.get(id(context))
        return sum(auth.refused.values()) if auth is not None and auth.context is context else 0


def curve_for(config: PipelineConfig) -> Curve | None:
    """The config's CURVE setup, or None when ``[security] curve`` is off. Raises CurveKeyError
    (a ConfigError) for missing or unreadable keys."""
    security = getattr(config, "security", None)
    if security is None or not security.curve:
        return None
    return Curve(security)


def stop_authenticator(context: zmq.Context) -> None:
    """Stop this context's authenticator, if one runs (before the context is terminated)."""
    with _authenticators_lock:
        auth = _authenticators.pop(id(context), None)
    if auth is not None:
        auth.stop()
