"""``Store``: one database and one repository object per aggregate.

The store owns the engine, the write lock and the transaction helper (``transactions.py``), migrates
the database to the newest schema at open (``schema.py``), and hands each repository the one shared
``Transactions``: ``store.jobs``, ``store.teams``, ``store.tokens``, ``store.audit``,
``store.deployments``. A repository writes only its own tables, each call in its own transaction; no
operation spans two aggregates in one transaction today (submitting a job and auditing it are two
commits). One that must would take the shared ``Transactions`` in a function beside the
repositories it joins, not a method on either.
"""

from __future__ import annotations

from orchestrator.store.access import AuditLog, TeamRepository, TokenRepository
from orchestrator.store.deployments import DeploymentRepository
from orchestrator.store.jobs import JobRepository
from orchestrator.store.schema import upgrade_to_head
from orchestrator.store.transactions import Transactions, open_engine


class Store:
    """Jobs, teams, user tokens, the audit log and serving deployments, in one database."""

    def __init__(self, url: str, sqlite_synchronous: str = "FULL"):
        self.url = url
        self.engine = open_engine(url, sqlite_synchronous)
        self._tx = Transactions(self.engine)
        self.is_sqlite = self._tx.is_sqlite
        self._migrate()
        self.jobs = JobRepository(self._tx)
        self.teams = TeamRepository(self._tx)
        self.tokens = TokenRepository(self._tx)
        self.audit = AuditLog(self._tx)
        self.deployments = DeploymentRepository(self._tx)

    def _migrate(self) -> None:
        """Upgrade the schema to head in one write transaction. On SQLite foreign keys are off meanwhile
        (SQLite's own recipe for schema changes: a revision that rebuilds ``jobs`` by copy would
        otherwise cascade-check its children) and checked before the commit."""
        if not self.is_sqlite:
            with self._tx() as conn:
                upgrade_to_head(conn)
            return
        with self.engine.connect() as conn:
            raw = conn.connection.driver_connection  # the pragma is a no-op inside a transaction
            raw.execute("PRAGMA foreign_keys=OFF")
            try:
                with self._tx.write_lock, conn.execution_options(write=True).begin():
                    upgrade_to_head(conn)
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise RuntimeError(f"the migrated database breaks foreign keys: {broken[:5]}")
            finally:
                raw.execute("PRAGMA foreign_keys=ON")

    def ping(self) -> None:
        with self._tx(write=False) as conn:
            conn.exec_driver_sql("SELECT 1")

    def close(self) -> None:
        self.engine.dispose()
