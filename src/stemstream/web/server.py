"""Run the dashboard on uvicorn: ``stemstream serve`` and the dashboard role of ``run``/``demo``."""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket

from stemstream.core.config import PipelineConfig

log = logging.getLogger(__name__)

TOKEN_ENV = "STEMSTREAM_TOKEN"


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str, start: int, tries: int = 20) -> int | None:
    """``start`` or the first free port after it (None if ``tries`` ports are all taken)."""
    for port in range(start, min(start + tries, 65536)):
        if port_is_free(host, port):
            return port
    return None


def resolve_token(given: str | None) -> tuple[str, bool]:
    """The token from ``--token``, else ``$STEMSTREAM_TOKEN``, else a new random one (True then)."""
    token = given or os.environ.get(TOKEN_ENV, "")
    if token:
        return token, False
    return secrets.token_urlsafe(18), True


def dashboard_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("localhost" if host == "::" else host)
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def serve(config: PipelineConfig, host: str, port: int, catalog_url: str, token: str, *,
          public_read: bool = False, exit_on_shutdown: bool = False, log_level: str = "warning",
          announce=None) -> None:
    """Serve the dashboard until interrupted (or, with ``exit_on_shutdown``, until control stops
    the pipeline). Raises CatalogError / OSError for a catalog or a port that cannot be used."""
    import uvicorn

    from stemstream.web.app import create_app
    from stemstream.web.catalog import Catalog

    if not port_is_free(host, port):
        raise OSError(f"port {port} on {host} is in use: choose another with --port or [network] dashboard_port")
    catalog = Catalog(catalog_url)
    open_reads = is_loopback(host) or public_read
    url = dashboard_url(host, port)
    app = create_app(config, catalog, token, open_reads=open_reads, exit_on_shutdown=exit_on_shutdown, url=url)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                           ws_ping_interval=20, ws_ping_timeout=20, lifespan="on"))

    def stop() -> None:
        server.should_exit = True

    app.state.monitor.on_shutdown = stop
    if announce is not None:
        announce(url, open_reads)
    try:
        server.run()
    finally:
        catalog.close()
