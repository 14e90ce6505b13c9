"""The web dashboard: ``stemstream serve`` (FastAPI on uvicorn).

- :mod:`.app`: the application: routers, errors, the live monitor's lifetime;
- :mod:`.pages` (HTML, images, downloads), :mod:`.api` (JSON), :mod:`.push` (WebSocket);
- :mod:`.access`: the token, for reads off loopback and for every change;
- :mod:`.live`: the poller that asks control for status and the writer for live images, and pushes them;
- :mod:`.catalog`: past scans in SQLite or any SQLAlchemy database;
- :mod:`.server`: uvicorn, ports and the token.

See docs/dashboard.md.
"""
