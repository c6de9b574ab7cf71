"""The audit database schema: append-only, hash-chained tables (SQLAlchemy 2.0 typed models).

Every audit row's primary key is its position in one global chain (``id`` = sequence
number across all tables), and each row stores the hash of the previous row and its own
hash over its content. Nothing is updated in place except ``chain_head``, a pointer to the
last link that makes appending cheap; ``boneflow audit --verify`` recomputes the chain.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UID = String(64)
HASH = String(64)


class Base(DeclarativeBase):
    """Declarative base of the audit schema."""


class ChainedRow(Base):
    """Columns every audit row carries."""

    __abstract__ = True

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    prev_hash: Mapped[str] = mapped_column(HASH)
    row_hash: Mapped[str] = mapped_column(HASH)


class ChainHead(Base):
    """The last link of the chain (one row, id 1): the only row ever updated."""

    __tablename__ = "chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(HASH)


class Association(ChainedRow):
    """An association request: who called, from where, and whether we accepted."""

    __tablename__ = "associations"

    calling_ae_title: Mapped[str] = mapped_column(String(16))
    called_ae_title: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    accepted: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text)


class Instance(ChainedRow):
    """A received (or refused) instance."""

    __tablename__ = "instances"

    association_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(UID)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    transfer_syntax: Mapped[str | None] = mapped_column(UID)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    spool_path: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)  # InstanceStatus
    reason: Mapped[str | None] = mapped_column(Text)
    elapsed_ms: Mapped[float | None] = mapped_column(Float)


class Job(ChainedRow):
    """A unit of queued work; ``key`` makes enqueueing idempotent."""

    __tablename__ = "jobs"

    kind: Mapped[str] = mapped_column(String(16), index=True)  # JobKind
    key: Mapped[str] = mapped_column(String(255), unique=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    payload: Mapped[str] = mapped_column(Text)  # JSON


class JobStateChange(ChainedRow):
    """One state a job entered; the latest row is its current state."""

    __tablename__ = "job_states"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # JobState
    attempt: Mapped[int] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)


class JobInstance(ChainedRow):
    """An instance a job covers (an analysis job covers the images of one settled batch)."""

    __tablename__ = "job_instances"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    instance_id: Mapped[int | None] = mapped_column(BigInteger)


class Result(ChainedRow):
    """The analysis of one image."""

    __tablename__ = "results"

    job_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    status: Mapped[str] = mapped_column(String(16))  # ResultStatus
    body_part: Mapped[str | None] = mapped_column(String(32))
    body_part_confidence: Mapped[float | None] = mapped_column(Float)
    fracture_probability: Mapped[float | None] = mapped_column(Float)
    fracture_present: Mapped[bool | None] = mapped_column(Boolean)
    threshold: Mapped[float | None] = mapped_column(Float)
    models: Mapped[str] = mapped_column(Text)  # JSON {"router": "name@version", ...}
    timings_ms: Mapped[str] = mapped_column(Text)  # JSON {"preprocess": 12.3, ...}
    reason: Mapped[str | None] = mapped_column(Text)


class OutboxItem(ChainedRow):
    """A result object that must reach one destination."""

    __tablename__ = "outbox_items"

    job_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    destination: Mapped[str] = mapped_column(Text, index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)


class DispatchAttempt(ChainedRow):
    """One attempt to send an outbox item; ``sent`` and ``gave_up`` are final."""

    __tablename__ = "dispatch_attempts"

    outbox_item_id: Mapped[int] = mapped_column(ForeignKey("outbox_items.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # DispatchStatus
    error: Mapped[str | None] = mapped_column(Text)
    elapsed_ms: Mapped[float | None] = mapped_column(Float)


CHAINED_TABLES: tuple[type[ChainedRow], ...] = (
    Association,
    Instance,
    Job,
    JobInstance,
    JobStateChange,
    Result,
    OutboxItem,
    DispatchAttempt,
)
