"""The web dashboard: ``stemstream serve`` (FastAPI on uvicorn).

- :mod:`.app`: pages, JSON API, WebSocket push;
- :mod:`.live`: the poller that asks control for status and live images and pushes them;
- :mod:`.catalog`: past scans in SQLite or any SQLAlchemy database;
- :mod:`.scanfiles`: what a counted file says (facts, stored images) without loading its events;
- :mod:`.plots`: figures for ``stemstream show``;
- :mod:`.server`: uvicorn, ports and the token.

See docs/dashboard.md.
"""
