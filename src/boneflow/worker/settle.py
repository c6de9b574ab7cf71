"""Settle: turn studies that stopped receiving images into analyse jobs, exactly once.

The database is the source of truth. A study whose stored instances are not yet covered
by a job, and whose newest one is older than ``SETTLE_SECONDS``, becomes one analyse job
for those instances. The job key is derived from the study and the set of instances, so
several listeners settling the same study create one job (``Audit.job_created`` is
idempotent by key). Images that arrive later start a new job for the new images only.

The loop runs as a thread in every listener process. On start, and then now and again,
it queues again what the broker may have lost: unfinished jobs nobody is running, and
outbox items that were never sent.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from kombu.exceptions import KombuError
from sqlalchemy import exists, func, select

from boneflow.config import Settings
from boneflow.db.audit import Audit, DispatchStatus, InstanceStatus, JobKind, JobState
from boneflow.db.schema import (
    DispatchAttempt,
    Instance,
    JobInstance,
    JobStateChange,
    OutboxItem,
)
from boneflow.logs import log_context
from boneflow.worker.app import ANALYSIS_QUEUE
from boneflow.worker.locks import is_job_locked

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
SWEEP_SECONDS = 5.0  # how often lost work is looked for
QUEUED_GRACE_SECONDS = 10.0  # a QUEUED job may wait this long for a worker to take it
OUTBOX_IDLE_SECONDS = 15 * 60.0  # an unsent outbox item idle this long is queued again


@dataclass(frozen=True, slots=True)
class SettledStudy:
    """A study ready for analysis: the instances not yet covered by any job."""

    study_instance_uid: str
    patient_id: str | None
    instances: tuple[tuple[str, int], ...]  # (sop_instance_uid, instance_id)
    newest: datetime

    @property
    def key(self) -> str:
        """The idempotency key of its job: the study and exactly these instances."""
        digest = hashlib.sha256("\n".join(sorted(u for u, _ in self.instances)).encode())
        return f"analyse:{self.study_instance_uid}:{digest.hexdigest()[:32]}"


def settled_studies(
    audit: Audit, settle_seconds: float, now: datetime | None = None
) -> list[SettledStudy]:
    """Studies with stored, uncovered instances whose newest arrived ``settle_seconds`` ago."""
    covered = exists().where(JobInstance.sop_instance_uid == Instance.sop_instance_uid)
    query = (
        select(
            Instance.study_instance_uid,
            Instance.patient_id,
            Instance.sop_instance_uid,
            Instance.id,
            Instance.recorded_at,
        )
        .where(
            Instance.status == str(InstanceStatus.STORED),
            Instance.study_instance_uid.is_not(None),
            Instance.sop_instance_uid.is_not(None),
            ~covered,
        )
        .order_by(Instance.id)
    )
    studies: dict[str, _Pending] = {}
    with audit.session() as session:
        for study, patient, sop, instance_id, recorded_at in session.execute(query):
            if study is None or sop is None:
                continue
            when = _utc(recorded_at)
            pending = studies.setdefault(study, _Pending(patient, {}, when))
            pending.sops.setdefault(sop, int(instance_id))
            pending.newest = max(pending.newest, when)
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=settle_seconds)
    return [
        SettledStudy(study, p.patient_id, tuple(p.sops.items()), p.newest)
        for study, p in studies.items()
        if p.newest <= cutoff
    ]


@dataclass(slots=True)
class _Pending:
    patient_id: str | None
    sops: dict[str, int]
    newest: datetime


def create_jobs(audit: Audit, settle_seconds: float) -> list[tuple[int, bool]]:
    """Create the analyse job of every settled study; returns ``(job_id, created)`` pairs."""
    jobs = []
    for study in settled_studies(audit, settle_seconds):
        job_id, created = audit.job_created(
            kind=JobKind.ANALYSE,
            key=study.key,
            payload={
                "study_instance_uid": study.study_instance_uid,
                "sop_instance_uids": sorted(u for u, _ in study.instances),
            },
            study_instance_uid=study.study_instance_uid,
            patient_id=study.patient_id,
            instances=list(study.instances),
        )
        if created:
            with log_context(study_instance_uid=study.study_instance_uid, job_id=job_id):
                log.info("study settled: analyse job %s for %d images", job_id,
                         len(study.instances))  # fmt: skip
        jobs.append((job_id, created))
    return jobs


def lost_jobs(
    settings: Settings,
    audit: Audit,
    analysis_queue_empty: bool,
    queued_grace_seconds: float = QUEUED_GRACE_SECONDS,
) -> list[int]:
    """Unfinished analyse jobs the broker has probably lost; queue them again.

    - RUNNING or RETRYING and nobody holds the job's lock: the worker that ran it died
      (the lock dies with its holder), whatever the broker still keeps for later.
    - QUEUED for more than ``queued_grace_seconds`` while the analysis queue is empty:
      the broker lost the message (Redis restarted without persistence, a consumer of
      the embedded broker was killed holding it).

    A job queued twice is harmless: the task drops duplicates.
    """
    unfinished = audit.unfinished_jobs(JobKind.ANALYSE)
    if not unfinished:
        return []
    ids = [job_id for job_id, _state, _attempt in unfinished]
    with audit.session() as session:
        last_change = dict(
            session.execute(
                select(JobStateChange.job_id, func.max(JobStateChange.recorded_at))
                .where(JobStateChange.job_id.in_(ids))
                .group_by(JobStateChange.job_id)
            ).all()
        )
    cutoff = datetime.now(UTC) - timedelta(seconds=queued_grace_seconds)
    lost = []
    for job_id, state, _attempt in unfinished:
        if state == JobState.QUEUED and not (
            analysis_queue_empty and _utc(last_change[job_id]) <= cutoff
        ):
            continue
        if not is_job_locked(settings, audit, job_id):
            lost.append(job_id)
    return lost


def unsent_outbox_items(audit: Audit, older_than_seconds: float = 0.0) -> list[int]:
    """Outbox items with no final attempt (SENT or GAVE_UP) and no attempt for a while."""
    final = [str(DispatchStatus.SENT), str(DispatchStatus.GAVE_UP)]
    cutoff = datetime.now(UTC) - timedelta(seconds=older_than_seconds)
    done = exists().where(
        DispatchAttempt.outbox_item_id == OutboxItem.id, DispatchAttempt.status.in_(final)
    )
    recent = exists().where(
        DispatchAttempt.outbox_item_id == OutboxItem.id, DispatchAttempt.recorded_at > cutoff
    )
    query = select(OutboxItem.id).where(~done, OutboxItem.recorded_at <= cutoff)
    if older_than_seconds > 0:
        query = query.where(~recent)
    with audit.session() as session:
        return [int(i) for i in session.scalars(query.order_by(OutboxItem.id))]


class SettleLoop:
    """The settle thread of a listener process: settles studies and re-queues lost work.

    Args:
        settings: the node's settings (``settle_seconds``).
        audit: this process' audit connection.
        enqueue_analysis: publishes ``analyse_study(job_id)``; may raise when the broker is
            down (the job is then published again on a later round).
        enqueue_dispatch: publishes ``send_result(outbox_item_id)``.
        queue_depths: the broker's queue depths, None when it cannot be reached.
        poll_seconds: how often the database is asked for settled studies.
        sweep_seconds: how often lost work is looked for (see :func:`lost_jobs`).
    """

    def __init__(
        self,
        settings: Settings,
        audit: Audit,
        enqueue_analysis: Callable[[int], None],
        enqueue_dispatch: Callable[[int], None],
        queue_depths: Callable[[], Mapping[str, int] | None],
        poll_seconds: float = POLL_SECONDS,
        sweep_seconds: float = SWEEP_SECONDS,
    ) -> None:
        self.settings = settings
        self.audit = audit
        self._enqueue_analysis = enqueue_analysis
        self._enqueue_dispatch = enqueue_dispatch
        self.poll_seconds = poll_seconds
        self._queue_depths = queue_depths
        self.sweep_seconds = sweep_seconds
        self._unpublished: set[int] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sweep = time.monotonic()
        self.on_job_created: Callable[[int], None] | None = None

    def recover(self) -> tuple[int, int]:
        """Queue again unfinished jobs nobody runs and unsent outbox items (at start).

        Returns:
            ``(jobs, outbox_items)`` queued again.
        """
        depths = self._queue_depths()
        empty = depths is not None and depths.get(ANALYSIS_QUEUE, 0) == 0
        jobs = lost_jobs(self.settings, self.audit, empty, queued_grace_seconds=0.0)
        for job_id in jobs:
            self._publish(job_id)
        items = unsent_outbox_items(self.audit)
        for item_id in items:
            self._publish_dispatch(item_id)
        if jobs or items:
            log.info("recovery: queued again %d jobs and %d outbox items", len(jobs), len(items))
        return len(jobs), len(items)

    def run_once(self) -> list[int]:
        """One round: publish what failed before, settle studies, sweep now and again."""
        for job_id in sorted(self._unpublished):
            self._publish(job_id)
        created = []
        for job_id, is_new in create_jobs(self.audit, self.settings.settle_seconds):
            if is_new:
                created.append(job_id)
                if self.on_job_created is not None:
                    self.on_job_created(job_id)
                self._publish(job_id)
        if time.monotonic() - self._last_sweep >= self.sweep_seconds:
            self._last_sweep = time.monotonic()
            self._sweep()
        return created

    def wake(self) -> None:
        """Ask for a round soon (an image was stored)."""
        self._wake.set()

    def start(self) -> None:
        """Run rounds in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="boneflow-settle", daemon=True)
        self._thread.start()

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """Stop the thread and wait for it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_seconds)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # the loop must outlive a database or broker outage
                log.exception("settle round failed; trying again")
                self._stop.wait(1.0)
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def _sweep(self) -> None:
        depths = self._queue_depths()
        if depths is None:  # the broker is away; nothing can be queued now anyway
            return
        empty = depths.get(ANALYSIS_QUEUE, 0) == 0
        for job_id in lost_jobs(self.settings, self.audit, empty):
            log.warning("analyse job %s was lost by the broker or its worker; queued again",
                        job_id)  # fmt: skip
            self._publish(job_id)
        for item_id in unsent_outbox_items(self.audit, older_than_seconds=OUTBOX_IDLE_SECONDS):
            self._publish_dispatch(item_id)

    def _publish(self, job_id: int) -> None:
        try:
            self._enqueue_analysis(job_id)
        except (KombuError, OSError) as exc:  # broker down: the job waits in the database
            log.warning("cannot queue analyse job %s (%s); will retry", job_id, exc)
            self._unpublished.add(job_id)
        else:
            self._unpublished.discard(job_id)

    def _publish_dispatch(self, item_id: int) -> None:
        try:
            self._enqueue_dispatch(item_id)
        except (KombuError, OSError) as exc:  # broker down: the item stays in the database
            log.warning("cannot queue outbox item %s (%s)", item_id, exc)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
