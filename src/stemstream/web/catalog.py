"""The catalog of past scans: one row per counted file, in any SQL database SQLAlchemy can reach.

SQLite by default (``sqlite:///<output_dir>/catalog.db``); another database by its SQLAlchemy URL
(e.g. ``postgresql+psycopg://user@host/stemstream``, with that database's driver installed). Rows
come from the writer's summary when control reports a scan closed, or from a file's own metadata
(:meth:`Catalog.add_file`, used to index the output directory when the dashboard starts). A file's
path is unique: a scan resumed into the same file (``stemstream replay``) updates its row.

Deleting an entry hides it (the row stays as a tombstone, so re-indexing the directory does not
bring it back); the file itself is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

log = logging.getLogger(__name__)

#: How many of the newest catalog entries the live page lists.
RECENT = 12
#: The largest catalog id, scan number or offset a request may name: the columns are SQL INTEGERs,
#: 32 bits in most databases (SQLite's 64 bits; past those its driver raises OverflowError).
MAX_INTEGER = 2**31 - 1


class CatalogError(RuntimeError):
    """The catalog's database cannot be used; the message is one sentence."""


_metadata = sa.MetaData()
scans_table = sa.Table(
    "stemstream_scans",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("scan_number", sa.Integer, nullable=False, index=True),
    sa.Column("path", sa.String(1024), nullable=False, unique=True),
    sa.Column("file_name", sa.String(255), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # closed | failed | file
    sa.Column("started", sa.Float),  # wall clock, s
    sa.Column("closed", sa.Float),
    sa.Column("scan_rows", sa.Integer),
    sa.Column("scan_cols", sa.Integer),
    sa.Column("frames_per_position", sa.Integer),
    sa.Column("frames_expected", sa.BigInteger),
    sa.Column("frames_complete", sa.BigInteger),
    sa.Column("frames_incomplete", sa.BigInteger),
    sa.Column("frames_missing", sa.BigInteger),
    sa.Column("events", sa.BigInteger),
    sa.Column("seconds", sa.Float),
    sa.Column("frames_per_second", sa.Float),
    sa.Column("accounted", sa.Boolean),  # every expected frame complete, nothing rejected
    sa.Column("ledger", sa.JSON),
    sa.Column("thresholds", sa.JSON),
    sa.Column("images", sa.JSON),  # {"<analysis>/<result>": PNG path}
    sa.Column("source", sa.String(16)),  # stream | file
    sa.Column("hidden", sa.Boolean, nullable=False, default=False),
)

_PUBLIC = [c.name for c in scans_table.columns if c.name != "hidden"]


def catalog_url(value: str | None, output_dir: str | os.PathLike) -> str:
    """The SQLAlchemy URL for ``--catalog``: a URL as given, a plain path as an SQLite file, and
    nothing as ``<output_dir>/catalog.db``."""
    if not value:
        return f"sqlite:///{Path(output_dir).resolve() / 'catalog.db'}"
    if "://" in value:
        return value
    return f"sqlite:///{Path(value).resolve()}"


def accounted(ledger: dict) -> bool:
    return (ledger.get("frames_complete", -1) == ledger.get("frames_expected")
            and ledger.get("frames_incomplete", 1) == 0
            and ledger.get("frames_over_capacity", 0) == 0
            and sum(ledger.get("sectors_rejected", [1])) == 0)


def _safe_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the catalog URL"


class Catalog:
    """Rows of past scans. Thread safe (SQLAlchemy's pool; SQLite writes serialised here)."""

    def __init__(self, url: str):
        self.url = url
        self.shown_url = _safe_url(url)
        try:
            parsed = sa.engine.make_url(url)
        except sa.exc.ArgumentError:
            raise CatalogError(f"--catalog {url!r} is not a database URL (e.g. sqlite:///scans.db)") from None
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            folder = Path(parsed.database).parent
            if not folder.is_dir():
                raise CatalogError(f"the catalog's folder {folder} does not exist")
        kwargs: dict[str, Any] = {"future": True}
        if parsed.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
            if parsed.database in (None, "", ":memory:"):
                kwargs["poolclass"] = sa.pool.StaticPool  # one shared in-memory database
        try:
            self.engine = sa.create_engine(url, **kwargs)
            _metadata.create_all(self.engine)
        except (sa.exc.NoSuchModuleError, ModuleNotFoundError) as exc:
            raise CatalogError(f"no driver for the catalog {self.shown_url}: {exc}") from None
        except sa.exc.SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise CatalogError(f"cannot open the catalog {self.shown_url}: {reason}") from None
        self._lock = threading.Lock()
        self.version = 0  # bumped on every change, so the dashboard knows when to push the list

    # -- writing ----------------------------------------------------------------------------------

    def _upsert(self, row: dict) -> int:
        with self._lock, self.engine.begin() as conn:
            existing = conn.execute(sa.select(scans_table.c.id, scans_table.c.hidden)
                                    .where(scans_table.c.path == row["path"])).first()
            if existing is None:
                result = conn.execute(sa.insert(scans_table).values(**row, hidden=False))
                entry = int(result.inserted_primary_key[0])
            else:
                conn.execute(sa.update(scans_table).where(scans_table.c.id == existing.id).values(**row))
                entry = int(existing.id)
            self.version += 1
            return entry

    def add_summary(self, summary: dict, started: float | None = None, state: str = "closed") -> int | None:
        """Record a scan from the writer's summary (what control reports with ``scan_done``);
        None when the summary names no file (a failed scan)."""
        path = summary.get("path")
        ledger = summary.get("ledger")
        if not path or not isinstance(ledger, dict):
            return None
        from stemstream.analysis.stored import png_images_beside

        row = {
            "scan_number": int(summary.get("scan", ledger.get("scan_number", 0))),
            "path": str(path),
            "file_name": Path(path).name,
            "state": state,
            "started": started,
            "closed": summary.get("closed_wall") or time.time(),
            "scan_rows": ledger.get("scan_rows"),
            "scan_cols": ledger.get("scan_cols"),
            "frames_per_position": ledger.get("frames_per_position"),
            "frames_expected": ledger.get("frames_expected"),
            "frames_complete": ledger.get("frames_complete"),
            "frames_incomplete": ledger.get("frames_incomplete"),
            "frames_missing": ledger.get("frames_missing"),
            "events": summary.get("events"),
            "seconds": summary.get("seconds"),
            "frames_per_second": summary.get("frames_per_second"),
            "accounted": accounted(ledger),
            "ledger": ledger,
            "thresholds": summary.get("thresholds"),
            "images": png_images_beside(path, summary.get("images") or None),
            "source": "stream",
        }
        return self._upsert(row)

    def add_file(self, path: str | os.PathLike) -> int:
        """Record a counted file from its own metadata (CountedFileError if it is not one)."""
        from stemstream.analysis.stored import file_facts, png_images_beside

        facts = file_facts(path)
        meta = facts["stemstream"]
        ledger = meta.get("ledger") if isinstance(meta.get("ledger"), dict) else {}
        ledger = {k: v for k, v in ledger.items() if k != "written"}
        rows, cols = facts["scan_shape"]
        fpp = facts["frames_per_position"]
        counting = facts["electron_counting"]
        thresholds = None
        if "background_threshold" in counting:
            thresholds = {"background": counting.get("background_threshold"), "xray": counting.get("x_ray_threshold"),
                          "calculated": bool(counting.get("threshold_calculated", False))}
        number = meta.get("scan_number", ledger.get("scan_number"))
        if number is None:  # facility names end in _<scan>.h5
            tail = Path(path).stem.rsplit("_", 1)[-1]
            number = int(tail) if tail.isdigit() else 0
        row = {
            "scan_number": int(number),
            "path": str(Path(path).resolve()),
            "file_name": Path(path).name,
            "state": "file",
            "started": None,
            "closed": facts["modified"],
            "scan_rows": rows, "scan_cols": cols, "frames_per_position": fpp,
            "frames_expected": ledger.get("frames_expected", rows * cols * fpp),
            "frames_complete": ledger.get("frames_complete"),
            "frames_incomplete": ledger.get("frames_incomplete"),
            "frames_missing": ledger.get("frames_missing"),
            "events": meta.get("events"),
            "seconds": meta.get("seconds"),
            "frames_per_second": None,
            "accounted": accounted(ledger) if ledger else None,
            "ledger": ledger or None,
            "thresholds": thresholds,
            "images": png_images_beside(path),
            "source": "file",
        }
        return self._upsert(row)

    def index_directory(self, folder: str | os.PathLike, limit: int = 10000) -> int:
        """Add the counted files in ``folder`` the catalog does not know yet (hidden ones stay
        hidden); returns how many were added. Unreadable files are skipped with a log line."""
        folder = Path(folder)
        if not folder.is_dir():
            return 0
        with self.engine.connect() as conn:
            known = {r[0] for r in conn.execute(sa.select(scans_table.c.path))}
        added = 0
        for path in sorted(folder.glob("*.h5"))[:limit]:
            if str(path.resolve()) in known or str(path) in known:
                continue
            try:
                self.add_file(path)
                added += 1
            except (ValueError, OSError) as exc:
                log.info("not indexed: %s", exc)
        return added

    def hide(self, entry: int) -> bool:
        """Delete an entry from the catalog (not the file); False if there is no such entry."""
        with self._lock, self.engine.begin() as conn:
            result = conn.execute(sa.update(scans_table)
                                  .where(scans_table.c.id == entry, scans_table.c.hidden.is_(False))
                                  .values(hidden=True))
            if result.rowcount:
                self.version += 1
            return bool(result.rowcount)

    # -- reading ----------------------------------------------------------------------------------

    @staticmethod
    def _row(row) -> dict:
        d = {name: getattr(row, name) for name in _PUBLIC}
        for key in ("ledger", "thresholds", "images"):
            if isinstance(d[key], str):  # some databases hand JSON back as text
                d[key] = json.loads(d[key])
        d["images"] = d["images"] or {}
        return d

    def list(self, limit: int = 50, offset: int = 0, scan_number: int | None = None) -> list[dict]:
        """Visible entries, newest first."""
        query = (sa.select(*[scans_table.c[n] for n in _PUBLIC]).where(scans_table.c.hidden.is_(False))
                 .order_by(scans_table.c.closed.desc(), scans_table.c.id.desc()).limit(limit).offset(offset))
        if scan_number is not None:
            query = query.where(scans_table.c.scan_number == scan_number)
        with self.engine.connect() as conn:
            return [self._row(r) for r in conn.execute(query)]

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(scans_table)
                                    .where(scans_table.c.hidden.is_(False))).scalar_one())

    def get(self, entry: int) -> dict | None:
        query = sa.select(*[scans_table.c[n] for n in _PUBLIC]).where(scans_table.c.id == entry,
                                                                        scans_table.c.hidden.is_(False))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else self._row(row)

    def max_scan_number(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.max(scans_table.c.scan_number))).scalar() or 0)

    def close(self) -> None:
        self.engine.dispose()


# -- what the API and the pages show ----------------------------------------------------------------


def image_links(entry: int, keys, version: str = "") -> list[dict]:
    """Key, label and URL of each of a catalog entry's images; ``version`` (``?v=...``) makes a
    browser fetch an image again when the file behind it changed."""
    from stemstream.analysis.stored import image_label

    return [{"key": k, "label": image_label(k), "url": f"/scans/{entry}/images/{k}{version}"} for k in keys]


def catalog_row_json(row: dict) -> dict:
    """A catalog row as the API and the pages show it (image URLs instead of server paths)."""
    from stemstream.analysis.stored import image_order

    entry = row["id"]
    out = {k: v for k, v in row.items() if k != "images"}
    out["url"] = f"/scans/{entry}"
    out["file_url"] = f"/scans/{entry}/file"
    out["images"] = image_links(entry, image_order(row.get("images") or {}))
    out["thumbnail"] = out["images"][0]["url"] if out["images"] else None
    return out
