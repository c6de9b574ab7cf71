"""Job locks: at most one process runs a given job, and a dead holder frees it at once.

Redelivered and re-queued messages make duplicates normal (the broker is only a hint);
a task first takes its job's lock and drops the message if another process holds it.
The lock lives where the source of truth lives: a PostgreSQL advisory lock on a dedicated
connection, or, for SQLite (one machine), an ``flock`` on a file under ``DATA_DIR``.
Both vanish with the process that holds them, so a SIGKILL never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text

from boneflow.config import Settings
from boneflow.db.audit import Audit

log = logging.getLogger(__name__)

_LOCK_SPACE = 0x626F6E65  # "bone": keeps our advisory locks apart from other users'


@contextmanager
def job_lock(settings: Settings, audit: Audit, job_id: int) -> Iterator[bool]:
    """Try to take the lock of ``job_id`` without waiting; yields whether it was taken."""
    if audit.engine.dialect.name == "postgresql":
        with _advisory_lock(audit, job_id) as held:
            yield held
    else:
        with try_file_lock(lock_path(settings, job_id)) as held:
            yield held


def is_job_locked(settings: Settings, audit: Audit, job_id: int) -> bool:
    """True when some live process holds the lock of ``job_id`` right now."""
    with job_lock(settings, audit, job_id) as held:
        return not held


def lock_path(settings: Settings, job_id: int) -> Path:
    """The lock file of a job (SQLite deployments)."""
    return settings.data_dir / "locks" / f"job-{job_id}.lock"


def remove_lock_file(settings: Settings, job_id: int) -> None:
    """Remove the lock file of a finished job (whoever locks it later sees it final)."""
    try:
        lock_path(settings, job_id).unlink()
    except FileNotFoundError:
        return


@contextmanager
def try_file_lock(path: Path) -> Iterator[bool]:
    """A non-blocking ``flock`` on ``path``: yields whether we hold it.

    The lock dies with its process, so a killed holder never leaves one behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def _advisory_lock(audit: Audit, job_id: int) -> Iterator[bool]:
    with audit.engine.connect() as connection:
        held = bool(
            connection.execute(
                text("SELECT pg_try_advisory_lock(:space, :job)"),
                {"space": _LOCK_SPACE, "job": job_id % 2**31},
            ).scalar()
        )
        connection.commit()
        try:
            yield held
        finally:
            if held:
                connection.execute(
                    text("SELECT pg_advisory_unlock(:space, :job)"),
                    {"space": _LOCK_SPACE, "job": job_id % 2**31},
                )
                connection.commit()
