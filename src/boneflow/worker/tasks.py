"""The Celery tasks: thin, keyed by database ids, safe to run twice.

``analyse_study(job_id)`` runs one analyse job; ``send_result(outbox_item_id)`` makes one
send attempt of one outbox item. Both re-read their state from the audit database, so a
redelivered or re-queued message is harmless: a final job is skipped, a job another
process is running (its lock is held) is dropped, and an outbox item already sent is a
no-op of :func:`boneflow.worker.outbox.deliver`.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import Retry, SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from boneflow.db.audit import FINAL_JOB_STATES, JobState
from boneflow.db.schema import OutboxItem
from boneflow.errors import DestinationUnavailable
from boneflow.logs import log_context
from boneflow.worker.app import (
    ANALYSE_TASK,
    ANALYSIS_HARD_TIME_LIMIT_SECONDS,
    ANALYSIS_SOFT_TIME_LIMIT_SECONDS,
    MAX_ANALYSIS_ATTEMPTS,
    SEND_TASK,
)
from boneflow.worker.locks import job_lock, remove_lock_file

if TYPE_CHECKING:
    from boneflow.worker.app import BoneflowCelery
    from boneflow.worker.jobs import JobOutcome, JobRecord

log = logging.getLogger(__name__)

AnyTask = Task[Any, Any]

# A first attempt takes up to this many queued jobs (single-image studies, mostly) and
# runs the models over all their images at once; retries run alone.
BATCH_JOBS = 16
POSTGRESQL_BATCH_LOCKS = 7  # of a pool of 15 connections, leave most to the audit

# Errors that may pass: the database or the broker went away for a moment.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (OperationalError, ConnectionError)


def register_tasks(app: BoneflowCelery) -> None:
    """Register boneflow's tasks on ``app``."""

    @app.task(
        name=ANALYSE_TASK,
        shared=False,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=MAX_ANALYSIS_ATTEMPTS,
        soft_time_limit=ANALYSIS_SOFT_TIME_LIMIT_SECONDS,
        time_limit=ANALYSIS_HARD_TIME_LIMIT_SECONDS,
    )
    def analyse_study(self: AnyTask, job_id: int) -> None:
        """Analyse the images of one settled batch of a study; a no-op if already done."""
        try:
            run_analyse_task(app, self, int(job_id))
        except TRANSIENT_ERRORS as exc:  # the database is away: try again later
            log.warning("analyse job %s: %s; retrying in 30 s", job_id, exc)
            raise self.retry(exc=exc, countdown=30, max_retries=None) from None

    @app.task(
        name=SEND_TASK,
        shared=False,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        autoretry_for=(DestinationUnavailable, *TRANSIENT_ERRORS),
        retry_backoff=5,
        retry_backoff_max=600,
        retry_jitter=True,
        max_retries=None,
        soft_time_limit=600,
    )
    def send_result(self: AnyTask, outbox_item_id: int) -> None:
        """Send one outbox item to its destination; a no-op if it was already sent.

        Fresh items for the same destination go over the same association.
        """
        from boneflow.worker.outbox import deliver_with_companions

        audit = app.audit()
        with audit.session() as session:
            item = session.get(OutboxItem, int(outbox_item_id))
        context = {
            "study_instance_uid": item.study_instance_uid if item else None,
            "job_id": item.job_id if item else None,
        }
        with log_context(outbox_item_id=outbox_item_id, **context):
            status = deliver_with_companions(app.settings, audit, int(outbox_item_id))
            log.info("outbox item %s: %s", outbox_item_id, status)


def run_analyse_task(app: BoneflowCelery, task: AnyTask, job_id: int) -> None:
    """The body of ``analyse_study``: lock, count the attempt, run, record the outcome."""
    audit = app.audit()
    current = audit.job_state(job_id)
    if current is None:
        log.error("analyse job %s does not exist; message dropped", job_id)
        return
    if current[0] in FINAL_JOB_STATES:
        log.info("analyse job %s is already %s; nothing to do", job_id, current[0])
        return
    with job_lock(app.settings, audit, job_id) as held:
        if not held:
            log.info("analyse job %s is running elsewhere; duplicate message dropped", job_id)
            return
        _run_locked(app, task, job_id)
    if (state := audit.job_state(job_id)) is not None and state[0] in FINAL_JOB_STATES:
        remove_lock_file(app.settings, job_id)


def _run_locked(app: BoneflowCelery, task: AnyTask, job_id: int) -> None:
    from boneflow.worker.jobs import load_job

    audit = app.audit()
    state = audit.job_state(job_id)  # again, under the lock
    if state is None or state[0] in FINAL_JOB_STATES:
        return
    attempt = state[1] + 1
    job = load_job(audit, job_id)
    with log_context(study_instance_uid=job.study_instance_uid, job_id=job_id):
        if attempt > MAX_ANALYSIS_ATTEMPTS:
            detail = f"gave up after {MAX_ANALYSIS_ATTEMPTS} attempts (a worker died each time?)"
            audit.job_state_changed(job_id, JobState.FAILED, attempt=state[1], detail=detail)
            log.error("analyse job %s failed: %s", job_id, detail)
            return
        audit.job_state_changed(job_id, JobState.RUNNING, attempt=attempt, detail=_who(task))
        if attempt > 1:  # a retry runs alone, so that one bad job cannot fail others twice
            _run_alone(app, task, job, attempt)
            return
        with ExitStack() as locks:
            companions = _claim_companions(app, task, locks, job_id)
            if not companions:
                _run_alone(app, task, job, attempt)
                return
            _run_batch(app, [job, *companions])
        for companion in companions:
            if (done := audit.job_state(companion.job_id)) and done[0] in FINAL_JOB_STATES:
                remove_lock_file(app.settings, companion.job_id)


def _run_alone(app: BoneflowCelery, task: AnyTask, job: JobRecord, attempt: int) -> None:
    from boneflow.worker.jobs import run_analyses

    audit = app.audit()
    job_id = job.job_id
    try:
        outcome = run_analyses(app.settings, audit, [job])[job_id]
        if isinstance(outcome, Exception):
            raise outcome
    except TRANSIENT_ERRORS as exc:
        _retry(app, task, job_id, attempt, exc)
        return
    except SoftTimeLimitExceeded:
        detail = f"time limit of {ANALYSIS_SOFT_TIME_LIMIT_SECONDS} s exceeded"
        audit.job_state_changed(job_id, JobState.FAILED, attempt=attempt, detail=detail)
        log.error("analyse job %s failed: %s", job_id, detail)
        return
    except Exception as exc:  # a task edge: record the failure, keep the worker
        detail = f"{type(exc).__name__}: {exc}"
        audit.job_state_changed(job_id, JobState.FAILED, attempt=attempt, detail=detail)
        log.exception("analyse job %s failed", job_id)
        return
    _succeeded(app, job_id, attempt, outcome)


def _claim_companions(
    app: BoneflowCelery, task: AnyTask, locks: ExitStack, lead: int
) -> list[JobRecord]:
    """Lock and start up to ``BATCH_JOBS - 1`` other jobs waiting for their first attempt.

    A job is taken only while its lock is free and it is still QUEUED under the lock; its
    own message, delivered later, then finds it final (or running) and does nothing.
    """
    from boneflow.worker.jobs import load_job, queued_analyse_jobs

    audit = app.audit()
    claimed: list[JobRecord] = []
    wanted = BATCH_JOBS - 1
    if audit.engine.dialect.name == "postgresql":  # each lock holds a pooled connection
        wanted = min(wanted, POSTGRESQL_BATCH_LOCKS)
    for job_id in queued_analyse_jobs(audit, exclude=lead, limit=2 * BATCH_JOBS):
        if len(claimed) == wanted:
            break
        lock = ExitStack()
        if not lock.enter_context(job_lock(app.settings, audit, job_id)):
            lock.close()
            continue
        state = audit.job_state(job_id)
        if state is None or state[0] is not JobState.QUEUED:
            lock.close()
            continue
        locks.enter_context(lock)
        detail = f"{_who(task)}, in a batch led by job {lead}"
        audit.job_state_changed(job_id, JobState.RUNNING, attempt=1, detail=detail)
        claimed.append(load_job(audit, job_id))
    return claimed


def _run_batch(app: BoneflowCelery, jobs: list[JobRecord]) -> None:
    """Run first attempts together; a job that fails is queued again, to run alone."""
    from boneflow.worker.jobs import run_analyses

    audit = app.audit()

    def done(job: JobRecord, outcome: JobOutcome | Exception) -> None:
        with log_context(study_instance_uid=job.study_instance_uid, job_id=job.job_id):
            if not isinstance(outcome, Exception):
                _succeeded(app, job.job_id, 1, outcome)
                return
            detail = (
                f"{type(outcome).__name__}: {outcome}; failed in a batch of {len(jobs)}, "
                "runs again alone"
            )
            log.warning("analyse job %s: %s", job.job_id, detail)
            audit.job_state_changed(job.job_id, JobState.RETRYING, attempt=1, detail=detail)
            app.tasks[ANALYSE_TASK].apply_async((job.job_id,))

    run_analyses(app.settings, audit, jobs, on_done=done)
    log.info("analysed a batch of %d jobs", len(jobs))


def _succeeded(app: BoneflowCelery, job_id: int, attempt: int, outcome: JobOutcome) -> None:
    detail = outcome.describe()
    app.audit().job_state_changed(job_id, JobState.SUCCEEDED, attempt=attempt, detail=detail)
    log.info("analyse job %s done: %s", job_id, detail)
    send = app.tasks[SEND_TASK]
    for item_id in outcome.outbox_ids:
        send.delay(item_id)


def _retry(app: BoneflowCelery, task: AnyTask, job_id: int, attempt: int, exc: Exception) -> None:
    audit = app.audit()
    countdown = min(2.0 * 2**attempt, 120.0)
    detail = f"{type(exc).__name__}: {exc}; retry in {countdown:.0f} s"
    log.warning("analyse job %s: %s", job_id, detail)
    audit.job_state_changed(job_id, JobState.RETRYING, attempt=attempt, detail=detail)
    try:
        raise task.retry(exc=exc, countdown=countdown, max_retries=MAX_ANALYSIS_ATTEMPTS)
    except Retry:
        raise
    except Exception:  # retries exhausted: Celery re-raises the original error
        audit.job_state_changed(job_id, JobState.FAILED, attempt=attempt, detail=detail)
        log.exception("analyse job %s failed after retries", job_id)


def _who(task: AnyTask) -> str:
    request = task.request
    return f"worker {request.hostname or '?'} delivery {request.id or '?'}"
