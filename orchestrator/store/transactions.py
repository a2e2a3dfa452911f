"""The one way into the store's database, shared by every repository.

SQLite (WAL mode, ``synchronous=FULL`` unless ORCH_SQLITE_SYNCHRONOUS=NORMAL) by default; any SQLAlchemy
URL works. Every write runs in one transaction that takes the write lock first (``BEGIN IMMEDIATE`` on
SQLite, ``SELECT ... FOR UPDATE`` elsewhere), so a state check and the move it allows cannot interleave
with another writer's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event

SQLITE_BUSY_TIMEOUT_MS = 30_000  # writers queue behind each other this long before failing


def open_engine(url: str, sqlite_synchronous: str) -> Engine:
    """An engine for ``url``; on SQLite with the pragmas above and ``BEGIN IMMEDIATE`` for writes."""
    if sqlite_synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"sqlite_synchronous must be FULL or NORMAL, got {sqlite_synchronous!r}")
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    path = url.split("sqlite:///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # The driver's own transaction handling is off; SQLAlchemy's "begin" event below issues BEGIN.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit survives power loss; NORMAL (WAL): it survives a process crash, and commits
        # skip the fsync (several times the write throughput on slow disks).
        cur.execute(f"PRAGMA synchronous={sqlite_synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class Transactions:
    """``tx()``: a write transaction; ``tx(write=False)``: a read. Each repository holds the store's one
    instance, so all of them share one engine and one write lock."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        # Writers of this process queue on a fair lock rather than in SQLite's busy handler, which
        # sleeps in growing steps (up to 100 ms) and makes the latency tail long. Other processes
        # still meet busy_timeout. The store's migration takes it too.
        self.write_lock = threading.Lock()

    @property
    def locks_rows(self) -> bool:
        """Whether a write must lock the rows it reads (``FOR UPDATE``); SQLite's ``BEGIN IMMEDIATE``
        already holds the whole database."""
        return not self.is_sqlite

    @contextmanager
    def __call__(self, write: bool = True) -> Iterator[Connection]:
        if write and self.is_sqlite:
            with self.write_lock, self.engine.connect().execution_options(write=True) as conn, conn.begin():
                yield conn
            return
        with self.engine.connect().execution_options(write=write) as conn, conn.begin():
            yield conn
