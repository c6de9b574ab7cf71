"""The append-only audit API: one function per event, a hash chain, and verification.

Other subpackages write to the database only through :class:`Audit`. Reads for the
operators' views (``boneflow audit``, ``boneflow status``) are here too; a module that
needs its own read query uses :meth:`Audit.session` and the tables of ``schema``.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, bindparam, create_engine, event, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from boneflow.db.schema import (
    CHAINED_TABLES,
    Association,
    ChainedRow,
    ChainHead,
    DispatchAttempt,
    Instance,
    Job,
    JobInstance,
    JobStateChange,
    OutboxItem,
    Result,
)

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
_Row = TypeVar("_Row", bound=ChainedRow)


class InstanceStatus(enum.StrEnum):
    """What happened to a received instance."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    REFUSED = "refused"
    FAILED = "failed"


class JobKind(enum.StrEnum):
    """The kinds of queued work."""

    ANALYSE = "analyse"
    DISPATCH = "dispatch"


class JobState(enum.StrEnum):
    """States a job moves through; SUCCEEDED and FAILED are final."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


FINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED})


class ResultStatus(enum.StrEnum):
    """Whether an image was analysed."""

    ANALYSED = "analysed"
    NOT_ANALYSED = "not_analysed"
    FAILED = "failed"


class DispatchStatus(enum.StrEnum):
    """Outcome of one send attempt; SENT and GAVE_UP are final."""

    SENT = "sent"
    FAILED = "failed"
    GAVE_UP = "gave_up"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of the audit trail, flattened for display."""

    id: int
    recorded_at: datetime
    event: str
    study_instance_uid: str | None
    patient_id: str | None
    sop_instance_uid: str | None
    status: str
    detail: str


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """A place where the hash chain does not hold."""

    table: str
    row_id: int
    problem: str

    def __str__(self) -> str:
        return f"{self.table} row {self.row_id}: {self.problem}"


@dataclass(frozen=True, slots=True)
class TrailFilter:
    """Filters of ``boneflow audit``; ``None`` means any."""

    study_instance_uid: str | None = None
    patient_id: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 1000


def create_db_engine(database_url: str) -> Engine:
    """An engine configured for several processes writing the same database.

    SQLite gets WAL mode, a busy timeout and ``BEGIN IMMEDIATE`` transactions so that
    appends from the listener and the workers serialise instead of failing.
    """
    if database_url.startswith("sqlite"):
        engine = create_engine(
            database_url, connect_args={"timeout": 60, "check_same_thread": False}
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: object, _record: object) -> None:
            dbapi_connection.isolation_level = None  # type: ignore[attr-defined]
            cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: object) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")  # type: ignore[attr-defined]

        return engine
    return create_engine(database_url, pool_pre_ping=True)


class Audit:
    """Append-only access to the audit database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._write_lock_path = _sqlite_write_lock_path(engine)
        self._stored_id_sql = _STORED_ID_SQL.get(engine.dialect.paramstyle)

    @classmethod
    def open(cls, database_url: str) -> Audit:
        """Connect to ``database_url`` (the schema must exist: see ``boneflow db upgrade``)."""
        return cls(create_db_engine(database_url))

    def close(self) -> None:
        """Release the connection pool (call in a child process after fork, too)."""
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session for read queries; do not write through it."""
        with self._sessions() as session:
            yield session

    # ---- events -------------------------------------------------------------------

    def association_opened(
        self,
        *,
        calling_ae_title: str,
        called_ae_title: str,
        peer_address: str,
        peer_port: int,
        accepted: bool,
        reason: str | None = None,
    ) -> int:
        """Record an association request, accepted or refused (with why)."""
        return self._append(
            Association(
                calling_ae_title=calling_ae_title.strip()[:16],
                called_ae_title=called_ae_title.strip()[:16],
                peer_address=peer_address[:64],
                peer_port=peer_port,
                accepted=accepted,
                reason=reason,
            )
        )

    def instance_received(
        self,
        *,
        status: InstanceStatus,
        association_id: int | None = None,
        sop_instance_uid: str | None = None,
        sop_class_uid: str | None = None,
        study_instance_uid: str | None = None,
        series_instance_uid: str | None = None,
        patient_id: str | None = None,
        transfer_syntax: str | None = None,
        size_bytes: int | None = None,
        spool_path: str | None = None,
        reason: str | None = None,
        elapsed_ms: float | None = None,
    ) -> int:
        """Record an instance that was stored, a duplicate, refused or failed."""
        return self._append(
            Instance(
                association_id=association_id,
                sop_instance_uid=_clip(sop_instance_uid, 64),
                sop_class_uid=_clip(sop_class_uid, 64),
                study_instance_uid=_clip(study_instance_uid, 64),
                series_instance_uid=_clip(series_instance_uid, 64),
                patient_id=_clip(patient_id, 64),
                transfer_syntax=_clip(transfer_syntax, 64),
                size_bytes=size_bytes,
                spool_path=spool_path,
                status=str(status),
                reason=reason,
                elapsed_ms=elapsed_ms,
            )
        )

    def job_created(
        self,
        *,
        kind: JobKind,
        key: str,
        payload: Mapping[str, object],
        study_instance_uid: str | None = None,
        patient_id: str | None = None,
        instances: Sequence[tuple[str, int | None]] = (),
    ) -> tuple[int, bool]:
        """Create a job unless one with ``key`` exists, and record it QUEUED.

        The job, the instances it covers (``(sop_instance_uid, instance_id)`` pairs) and its
        QUEUED state are appended in one transaction: a crash leaves all or nothing.

        Returns:
            ``(job_id, created)``; ``created`` is False when the key already existed,
            which makes enqueueing idempotent across listeners and restarts.
        """
        existing = self.job_id_for_key(key)
        if existing is not None:
            return existing, False
        job = Job(
            kind=str(kind),
            key=key,
            study_instance_uid=study_instance_uid,
            patient_id=patient_id,
            payload=json.dumps(payload, sort_keys=True),
        )
        try:
            job_id = self._append(
                job,
                lambda job_id: (
                    [
                        JobInstance(job_id=job_id, sop_instance_uid=uid, instance_id=instance_id)
                        for uid, instance_id in instances
                    ]
                    + [JobStateChange(job_id=job_id, state=str(JobState.QUEUED), attempt=0)]
                ),
            )
        except IntegrityError:  # another process created it between our check and insert
            found = self.job_id_for_key(key)
            if found is None:
                raise
            return found, False
        return job_id, True

    def job_state_changed(
        self, job_id: int, state: JobState, *, attempt: int = 0, detail: str | None = None
    ) -> int:
        """Append a state change of a job."""
        return self._append(
            JobStateChange(job_id=job_id, state=str(state), attempt=attempt, detail=detail)
        )

    def result_recorded(
        self,
        *,
        sop_instance_uid: str,
        status: ResultStatus,
        job_id: int | None = None,
        study_instance_uid: str | None = None,
        body_part: str | None = None,
        body_part_confidence: float | None = None,
        fracture_probability: float | None = None,
        fracture_present: bool | None = None,
        threshold: float | None = None,
        models: Mapping[str, str] | None = None,
        timings_ms: Mapping[str, float] | None = None,
        reason: str | None = None,
    ) -> int:
        """Record the analysis of one image."""
        return self._append(
            Result(
                job_id=job_id,
                sop_instance_uid=sop_instance_uid,
                study_instance_uid=study_instance_uid,
                status=str(status),
                body_part=body_part,
                body_part_confidence=_float(body_part_confidence),
                fracture_probability=_float(fracture_probability),
                fracture_present=fracture_present,
                threshold=_float(threshold),
                models=json.dumps(dict(models or {}), sort_keys=True),
                timings_ms=json.dumps(
                    {k: round(float(v), 3) for k, v in (timings_ms or {}).items()},
                    sort_keys=True,
                ),
                reason=reason,
            )
        )

    def outbox_item_added(
        self,
        *,
        destination: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        path: str,
        study_instance_uid: str | None = None,
        job_id: int | None = None,
    ) -> int:
        """Record a result object that must reach ``destination``."""
        return self._append(
            OutboxItem(
                job_id=job_id,
                destination=destination,
                study_instance_uid=study_instance_uid,
                sop_instance_uid=sop_instance_uid,
                sop_class_uid=sop_class_uid,
                path=path,
            )
        )

    def dispatch_attempted(
        self,
        outbox_item_id: int,
        status: DispatchStatus,
        *,
        error: str | None = None,
        elapsed_ms: float | None = None,
    ) -> int:
        """Record one attempt to send an outbox item."""
        return self._append(
            DispatchAttempt(
                outbox_item_id=outbox_item_id,
                status=str(status),
                error=error,
                elapsed_ms=_float(elapsed_ms),
            )
        )

    # ---- reads --------------------------------------------------------------------

    def stored_instance_id(self, sop_instance_uid: str) -> int | None:
        """The audit id of the STORED row of this SOP Instance UID, if any.

        A plain read on a pooled DBAPI connection, outside any write transaction (a
        session would, on SQLite, take the database's write lock with BEGIN IMMEDIATE).
        """
        if self._stored_id_sql is None:  # a driver with named parameters: use SQLAlchemy
            with self.session() as session:
                return session.scalar(
                    select(Instance.id)
                    .where(
                        Instance.sop_instance_uid == sop_instance_uid,
                        Instance.status == str(InstanceStatus.STORED),
                    )
                    .limit(1)
                )
        sql = self._stored_id_sql
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                cursor.execute(sql, (sop_instance_uid, str(InstanceStatus.STORED)))
                found = cursor.fetchone()
            finally:
                cursor.close()
        finally:
            raw.close()
        return None if found is None else int(found[0])

    def job_id_for_key(self, key: str) -> int | None:
        """The id of the job with this idempotency key, if any."""
        with self.session() as session:
            return session.scalar(select(Job.id).where(Job.key == key))

    def job_state(self, job_id: int) -> tuple[JobState, int] | None:
        """The current state of a job and its attempt number."""
        with self.session() as session:
            row = session.execute(
                select(JobStateChange.state, JobStateChange.attempt)
                .where(JobStateChange.job_id == job_id)
                .order_by(JobStateChange.id.desc())
                .limit(1)
            ).first()
        return (JobState(row[0]), int(row[1])) if row else None

    def unfinished_jobs(self, kind: JobKind | None = None) -> list[tuple[int, JobState, int]]:
        """Jobs whose latest state is not final: ``(job_id, state, attempt)``."""
        latest = (
            select(JobStateChange.job_id, func.max(JobStateChange.id).label("last_id"))
            .group_by(JobStateChange.job_id)
            .subquery()
        )
        query = (
            select(JobStateChange.job_id, JobStateChange.state, JobStateChange.attempt)
            .join(latest, JobStateChange.id == latest.c.last_id)
            .join(Job, Job.id == JobStateChange.job_id)
            .where(JobStateChange.state.not_in([str(s) for s in FINAL_JOB_STATES]))
            .order_by(JobStateChange.job_id)
        )
        if kind is not None:
            query = query.where(Job.kind == str(kind))
        with self.session() as session:
            return [(int(r[0]), JobState(r[1]), int(r[2])) for r in session.execute(query)]

    def job_state_counts(self) -> dict[str, int]:
        """How many jobs are in each current state."""
        latest = (
            select(JobStateChange.job_id, func.max(JobStateChange.id).label("last_id"))
            .group_by(JobStateChange.job_id)
            .subquery()
        )
        query = (
            select(JobStateChange.state, func.count())
            .join(latest, JobStateChange.id == latest.c.last_id)
            .group_by(JobStateChange.state)
        )
        with self.session() as session:
            return {str(state): int(count) for state, count in session.execute(query)}

    def trail(self, filters: TrailFilter | None = None) -> list[AuditEntry]:
        """The audit trail, oldest first, filtered by study, patient, status and time."""
        filters = filters or TrailFilter()
        entries: list[AuditEntry] = []
        with self.session() as session:
            studies = _studies_of_patient(session, filters.patient_id)
            for table in CHAINED_TABLES:
                query = select(table).order_by(table.id)
                if filters.since is not None:
                    query = query.where(table.recorded_at >= filters.since)
                if filters.until is not None:
                    query = query.where(table.recorded_at <= filters.until)
                for row in session.scalars(query):
                    entry = _entry(session, row)
                    if _matches(entry, filters, studies):
                        entries.append(entry)
        entries.sort(key=lambda e: e.id)
        return entries[-filters.limit :] if filters.limit else entries

    def verify(self) -> list[ChainProblem]:
        """Recompute the hash chain; every edited, deleted or reordered row is reported."""
        problems: list[ChainProblem] = []
        with self.session() as session:
            rows: list[ChainedRow] = []
            for table in CHAINED_TABLES:
                rows.extend(session.scalars(select(table)))
            head = session.get(ChainHead, 1)
        rows.sort(key=lambda r: r.id)
        expected_prev = GENESIS_HASH
        expected_id = 1
        for row in rows:
            table = row.__tablename__
            if row.id != expected_id:
                problems.append(
                    ChainProblem(table, row.id, f"rows {expected_id}..{row.id - 1} are missing")
                )
            if row.prev_hash != expected_prev:
                problems.append(
                    ChainProblem(table, row.id, "does not follow the previous row (reordered?)")
                )
            if _row_hash(row, row.prev_hash) != row.row_hash:
                problems.append(ChainProblem(table, row.id, "content does not match its hash"))
            expected_prev = row.row_hash
            expected_id = row.id + 1
        head_seq = head.seq if head else 0
        if head_seq != expected_id - 1:
            problems.append(
                ChainProblem(
                    "chain_head",
                    head_seq,
                    f"the chain ends at row {expected_id - 1} but the head says {head_seq}",
                )
            )
        elif head is not None and head.hash != expected_prev:
            problems.append(ChainProblem("chain_head", head_seq, "last hash does not match"))
        return problems

    def head(self) -> tuple[int, str]:
        """The last sequence number and hash (anchor it elsewhere to detect truncation)."""
        with self.session() as session:
            head = session.get(ChainHead, 1)
        return (head.seq, head.hash) if head else (0, GENESIS_HASH)

    # ---- internals ----------------------------------------------------------------

    def _append(self, row: _Row, followers: Callable[[int], list[ChainedRow]] | None = None) -> int:
        """Append ``row`` (and rows made from its id) to the chain in one transaction.

        A single row is written with SQLAlchemy Core statements compiled once (about a
        quarter of the ORM's unit of work per row); rows with followers use the ORM. On
        SQLite, writers of all processes queue on a file lock before BEGIN IMMEDIATE, so
        they wake in turn instead of polling the busy timeout.
        """
        for attempt in range(20):
            try:
                with self._write_lock():
                    if followers is None:
                        return self._append_one(row)
                    return self._append_with_followers(row, followers)
            except OperationalError as exc:  # database busy or gone: wait, then retry
                if attempt == 19:
                    raise
                log.warning("audit database unavailable (%s); retrying", exc.orig)
                time.sleep(min(0.05 * 2**attempt, 5.0))
            except IntegrityError as exc:
                # Two first appends racing to create chain_head; anything else is real.
                if "chain_head" not in str(exc) or attempt == 19:
                    raise
        raise AssertionError("unreachable")

    def _append_one(self, row: ChainedRow) -> int:
        table: Any = row.__table__
        with self.engine.begin() as connection:
            head = connection.execute(_HEAD_FOR_UPDATE).first()
            if head is None:
                connection.execute(_HEAD_CREATE)
                seq, prev_hash = 0, GENESIS_HASH
            else:
                seq, prev_hash = int(head[0]), str(head[1])
            row.id = seq + 1
            row.recorded_at = datetime.now(UTC)
            row.prev_hash = prev_hash
            row.row_hash = _row_hash(row, prev_hash)
            values = {column.key: getattr(row, column.key) for column in table.columns}
            connection.execute(insert(table), values)
            connection.execute(_HEAD_UPDATE, {"seq": row.id, "hash": row.row_hash})
        return row.id

    def _append_with_followers(
        self, row: ChainedRow, followers: Callable[[int], list[ChainedRow]]
    ) -> int:
        with self._sessions() as session, session.begin():
            head = session.execute(
                select(ChainHead).where(ChainHead.id == 1).with_for_update()
            ).scalar_one_or_none()
            if head is None:
                head = ChainHead(id=1, seq=0, hash=GENESIS_HASH)
                session.add(head)
            now = datetime.now(UTC)
            links: list[ChainedRow] = [row, *followers(head.seq + 1)]
            for link in links:
                link.id = head.seq + 1
                link.recorded_at = now
                link.prev_hash = head.hash
                link.row_hash = _row_hash(link, head.hash)
                session.add(link)
                session.flush()
                head.seq = link.id
                head.hash = link.row_hash
        return row.id

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        """On a SQLite file: an exclusive lock shared by every process writing it."""
        if self._write_lock_path is None:
            yield
            return
        fd = os.open(self._write_lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock


_HEAD_FOR_UPDATE = select(ChainHead.seq, ChainHead.hash).where(ChainHead.id == 1).with_for_update()
_HEAD_CREATE = insert(ChainHead).values(id=1, seq=0, hash=GENESIS_HASH)
_HEAD_UPDATE = (
    update(ChainHead).where(ChainHead.id == 1).values(seq=bindparam("seq"), hash=bindparam("hash"))
)
_STORED_ID_SQL = {
    "qmark": "SELECT id FROM instances WHERE sop_instance_uid = ? AND status = ? LIMIT 1",
    "format": "SELECT id FROM instances WHERE sop_instance_uid = %s AND status = %s LIMIT 1",
    "pyformat": "SELECT id FROM instances WHERE sop_instance_uid = %s AND status = %s LIMIT 1",
}


def _sqlite_write_lock_path(engine: Engine) -> Path | None:
    """``<database file>.write-lock`` for a SQLite file database; None otherwise."""
    url = make_url(str(engine.url))
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(f"{url.database}.write-lock")


def _row_hash(row: ChainedRow, prev_hash: str) -> str:
    content = {
        column.name: _canonical(getattr(row, column.key))
        for column in row.__table__.columns
        if column.name not in {"row_hash", "prev_hash"}
    }
    payload = json.dumps(
        [prev_hash, row.__tablename__, content], sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _canonical(value: object) -> object:
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.isoformat(timespec="microseconds")
    if isinstance(value, float):
        return repr(value)
    return value


def _clip(value: str | None, length: int) -> str | None:
    return value[:length] if value is not None else None


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _entry(session: Session, row: ChainedRow) -> AuditEntry:
    study = getattr(row, "study_instance_uid", None)
    patient = getattr(row, "patient_id", None)
    sop = getattr(row, "sop_instance_uid", None)
    if isinstance(row, Association):
        event_name = "association"
        status = "accepted" if row.accepted else "refused"
        detail = (
            f"{row.calling_ae_title}@{row.peer_address}:{row.peer_port} -> {row.called_ae_title}"
        )
        if row.reason:
            detail += f" ({row.reason})"
    elif isinstance(row, Instance):
        event_name, status = "instance", row.status
        detail = f"{row.transfer_syntax or '-'} {row.size_bytes or 0} bytes"
        if row.reason:
            detail += f" ({row.reason})"
    elif isinstance(row, Job):
        event_name, status, detail = "job", "created", f"{row.kind} job {row.id} {row.key}"
    elif isinstance(row, JobInstance):
        job = session.get(Job, row.job_id)
        study = job.study_instance_uid if job else None
        patient = job.patient_id if job else None
        event_name, status, detail = "job_instance", "covered", f"job {row.job_id}"
    elif isinstance(row, JobStateChange):
        job = session.get(Job, row.job_id)
        study = job.study_instance_uid if job else None
        patient = job.patient_id if job else None
        event_name, status = "job_state", row.state
        detail = f"job {row.job_id} attempt {row.attempt}" + (
            f": {row.detail}" if row.detail else ""
        )
    elif isinstance(row, Result):
        event_name, status = "result", row.status
        if row.fracture_probability is not None:
            detail = f"{row.body_part} p(fracture)={row.fracture_probability:.3f} {row.models}"
        else:
            detail = f"{row.body_part or '-'} {row.reason or ''}".strip()
    elif isinstance(row, OutboxItem):
        event_name, status, detail = "outbox", "queued", f"item {row.id} -> {row.destination}"
    elif isinstance(row, DispatchAttempt):
        item = session.get(OutboxItem, row.outbox_item_id)
        study = item.study_instance_uid if item else None
        sop = item.sop_instance_uid if item else None
        event_name, status = "dispatch", row.status
        detail = f"item {row.outbox_item_id} -> {item.destination if item else '?'}" + (
            f": {row.error}" if row.error else ""
        )
    else:  # pragma: no cover - every chained table is handled above
        raise TypeError(type(row).__name__)
    return AuditEntry(row.id, row.recorded_at, event_name, study, patient, sop, status, detail)


def _studies_of_patient(session: Session, patient_id: str | None) -> set[str] | None:
    if patient_id is None:
        return None
    found = session.scalars(
        select(Instance.study_instance_uid).where(Instance.patient_id == patient_id).distinct()
    )
    return {uid for uid in found if uid}


def _matches(entry: AuditEntry, filters: TrailFilter, studies: set[str] | None) -> bool:
    if filters.status is not None and entry.status != filters.status:
        return False
    study = filters.study_instance_uid
    if study is not None and entry.study_instance_uid != study:
        return False
    return not (
        studies is not None
        and entry.patient_id != filters.patient_id
        and entry.study_instance_uid not in studies
    )
