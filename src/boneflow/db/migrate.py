"""Schema migrations (Alembic), run by ``boneflow db upgrade`` and at every start."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from boneflow.db.audit import create_db_engine

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def upgrade(database_url: str, revision: str = "head") -> str:
    """Bring the schema at ``database_url`` up to ``revision``; returns the revision reached.

    Creates the SQLite file's folder when needed. Safe to run when already current.
    """
    if database_url.startswith("sqlite:///"):
        Path(database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_db_engine(database_url)
    try:
        if current_revision(engine) == head_revision():
            return head_revision()
        config = _config(database_url)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
        reached = current_revision(engine) or ""
        log.info("database schema at revision %s", reached)
        return reached
    finally:
        engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    with engine.connect() as connection:
        revision: str | None = MigrationContext.configure(connection).get_current_revision()
        return revision


def head_revision() -> str:
    """The newest revision this version of boneflow knows."""
    head = ScriptDirectory.from_config(_config("sqlite://")).get_current_head()
    return head or ""


def _config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config
