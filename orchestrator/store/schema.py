"""Bring a store's database to the newest schema revision (Alembic), at every store open.

The revisions live in ``migrations/versions`` inside the package, so an installed copy migrates
without alembic.ini. Three kinds of database arrive here:

* empty: every revision runs, from the first;
* pre-Alembic (it has the hand-written ``schema_migrations`` table): each recorded version maps to the
  revision with the same schema (``LEGACY_VERSIONS``), which is stamped without running DDL; the old
  table is dropped and the usual upgrade continues from there, keeping every row;
* Alembic-managed: the revisions after its current one run; a revision this code does not know
  (written by a newer release) stops the open with ``SchemaTooNew`` rather than guess.

The caller holds the database's write transaction, so concurrent opens run the upgrade once.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Float, inspect, text

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
LEGACY_TABLE = "schema_migrations"
LEGACY_VERSIONS = {1: "0001"}  # pre-Alembic schema version -> the revision with the same schema


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer release of this code; opening it could corrupt it."""


def compare_type(_context, _inspected_col, _metadata_col, inspected_type, metadata_type) -> bool | None:
    """Alembic's type comparison, less one false alarm: SQLite reads DOUBLE PRECISION back as REAL (both
    8-byte floats there), which would make autogenerate propose altering every timestamp column."""
    if isinstance(inspected_type, Float) and isinstance(metadata_type, Float):
        return False
    return None  # Alembic's default comparison


def _config(conn: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = conn
    return cfg


def head_revision() -> str:
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert head is not None, f"no revisions in {MIGRATIONS_DIR}"
    return head


def current_revisions(conn: Connection) -> tuple[str, ...]:
    return MigrationContext.configure(conn).get_current_heads()


def _adopt_legacy(conn: Connection, tables: set[str]) -> None:
    """Stamp a pre-Alembic database at the revision matching its recorded version, then drop the old table."""
    versions = {row[0] for row in conn.execute(text(f"SELECT version FROM {LEGACY_TABLE}"))}
    if versions and max(versions) not in LEGACY_VERSIONS:
        raise SchemaTooNew(
            f"the database has pre-Alembic schema version {max(versions)}, which this code does not know "
            f"(it knows {sorted(LEGACY_VERSIONS)}); open it with the release that wrote it"
        )
    if versions:
        command.stamp(_config(conn), LEGACY_VERSIONS[max(versions)])
    elif tables - {LEGACY_TABLE}:
        raise RuntimeError(f"{LEGACY_TABLE} is empty but the database has tables {sorted(tables)}")
    conn.execute(text(f"DROP TABLE {LEGACY_TABLE}"))


def upgrade_to_head(conn: Connection) -> tuple[tuple[str, ...], str]:
    """Migrate the database behind ``conn`` (inside the caller's transaction) to the head revision.

    Returns the revisions it was at before (empty: a new database) and the head.
    """
    tables = set(inspect(conn).get_table_names())
    if LEGACY_TABLE in tables and "alembic_version" not in tables:
        _adopt_legacy(conn, tables)
    elif "alembic_version" not in tables and tables:
        raise RuntimeError(f"the database has tables {sorted(tables)} but no schema revision; is it a job store?")
    before = current_revisions(conn)
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    for rev in before:
        try:
            script.get_revision(rev)
        except CommandError:
            raise SchemaTooNew(
                f"the database is at schema revision {rev!r}, which this code does not know (a newer "
                f"release migrated it; this code's newest is {head_revision()!r}); upgrade the orchestrator"
            ) from None
    command.upgrade(_config(conn), "head")
    return before, head_revision()
