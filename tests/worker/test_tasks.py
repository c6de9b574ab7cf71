"""``analyse_study`` run in this process: what a redelivered or duplicate message does."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from boneflow.config import Settings
from boneflow.db.audit import Audit, JobKind, JobState
from boneflow.worker.app import ANALYSE_TASK, MAX_ANALYSIS_ATTEMPTS, BoneflowCelery, create_app
from boneflow.worker.locks import job_lock, lock_path
from boneflow.worker.tasks import run_analyse_task
from tests.worker.conftest import job_states, record_stored


@pytest.fixture
def app(settings: Settings) -> Iterator[BoneflowCelery]:
    celery = create_app(settings)
    try:
        yield celery
    finally:
        celery.close_runtime()
        celery.close()


def _job(audit: Audit, key: str = "analyse:1") -> int:
    instance = record_stored(audit, "1.2.3", f"{key}.1", path="/nonexistent/spooled.dcm")
    job_id, _ = audit.job_created(
        kind=JobKind.ANALYSE, key=key, payload={}, study_instance_uid="1.2.3",
        instances=[(f"{key}.1", instance)],
    )  # fmt: skip
    return job_id


def test_a_final_job_is_not_run_again(app: BoneflowCelery, audit: Audit) -> None:
    job_id = _job(audit)
    audit.job_state_changed(job_id, JobState.SUCCEEDED, attempt=1)
    run_analyse_task(app, app.tasks[ANALYSE_TASK], job_id)
    assert job_states(audit, job_id) == [("queued", 0), ("succeeded", 1)]


def test_a_job_another_process_runs_is_dropped(
    app: BoneflowCelery, audit: Audit, settings: Settings
) -> None:
    job_id = _job(audit)
    with job_lock(settings, audit, job_id) as held:
        assert held
        run_analyse_task(app, app.tasks[ANALYSE_TASK], job_id)
    assert job_states(audit, job_id) == [("queued", 0)]


def test_a_job_started_too_often_fails_instead_of_looping(
    app: BoneflowCelery, audit: Audit, settings: Settings
) -> None:
    job_id = _job(audit)
    for attempt in range(1, MAX_ANALYSIS_ATTEMPTS + 1):
        audit.job_state_changed(job_id, JobState.RUNNING, attempt=attempt)
    run_analyse_task(app, app.tasks[ANALYSE_TASK], job_id)
    assert audit.job_state(job_id) == (JobState.FAILED, MAX_ANALYSIS_ATTEMPTS)
    assert not lock_path(settings, job_id).exists()  # removed once the job is final


def test_a_job_whose_images_are_gone_fails_with_the_reason(
    app: BoneflowCelery, audit: Audit
) -> None:
    job_id = _job(audit)
    run_analyse_task(app, app.tasks[ANALYSE_TASK], job_id)
    assert job_states(audit, job_id) == [("queued", 0), ("running", 1), ("failed", 1)]
    with audit.session() as session:
        from sqlalchemy import select

        from boneflow.db.schema import JobStateChange

        detail = session.scalar(
            select(JobStateChange.detail).where(
                JobStateChange.job_id == job_id, JobStateChange.state == "failed"
            )
        )
    assert detail is not None and "UnreadableInstance" in detail


def test_a_missing_job_is_dropped(app: BoneflowCelery, audit: Audit) -> None:
    run_analyse_task(app, app.tasks[ANALYSE_TASK], 424242)
    assert audit.job_state(424242) is None
