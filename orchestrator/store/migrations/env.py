"""Alembic's environment for the job store.

At store open (``orchestrator.store.schema``) the caller's connection, already inside its write
transaction, arrives in ``config.attributes["connection"]``; from the ``alembic`` command line
(alembic.ini beside this file) a connection to ORCH_DB_URL or the ini's URL is opened here.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine

from orchestrator.store.schema import compare_type
from orchestrator.store.tables import metadata

config = context.config


def _run(connection) -> None:
    # render_as_batch: SQLite alters a table by copying it, which autogenerate then writes for us.
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True, compare_type=compare_type)
    with context.begin_transaction():
        context.run_migrations()


if (conn := config.attributes.get("connection")) is not None:
    _run(conn)
else:
    if config.config_file_name:
        fileConfig(config.config_file_name)
    url = os.environ.get("ORCH_DB_URL") or config.get_main_option("sqlalchemy.url")
    with create_engine(url).connect() as cli_conn:
        _run(cli_conn)
        cli_conn.commit()
