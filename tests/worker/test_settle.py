"""Settle: a study becomes one analyse job once quiet; several listeners, one job."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from boneflow.db.audit import Audit, DispatchStatus, JobKind, JobState
from boneflow.db.migrate import upgrade
from boneflow.db.schema import Job, JobInstance
from boneflow.worker.locks import job_lock
from boneflow.worker.settle import (
    SettleLoop,
    create_jobs,
    lost_jobs,
    settled_studies,
    unsent_outbox_items,
)
from tests.worker.conftest import make_settings, record_stored


@pytest.fixture
def db(database_url: str) -> Iterator[Audit]:
    upgrade(database_url)
    audit = Audit.open(database_url)
    try:
        yield audit
    finally:
        audit.close()


def _jobs(audit: Audit) -> list[tuple[int, str | None, list[str]]]:
    with audit.session() as session:
        jobs = session.execute(select(Job.id, Job.study_instance_uid).order_by(Job.id)).all()
        return [
            (
                job_id,
                study,
                sorted(
                    session.scalars(
                        select(JobInstance.sop_instance_uid).where(JobInstance.job_id == job_id)
                    )
                ),
            )
            for job_id, study in jobs
        ]


def test_a_study_settles_only_after_its_newest_image_is_old_enough(db: Audit) -> None:
    record_stored(db, "1.2.3", "1.2.3.1")
    record_stored(db, "1.2.3", "1.2.3.2")
    assert settled_studies(db, settle_seconds=3600) == []
    later = datetime.now(UTC) + timedelta(seconds=3601)
    (study,) = settled_studies(db, settle_seconds=3600, now=later)
    assert study.study_instance_uid == "1.2.3"
    assert sorted(uid for uid, _ in study.instances) == ["1.2.3.1", "1.2.3.2"]
    assert study.patient_id == "P1"


def test_one_job_per_settled_batch_and_late_images_start_a_new_one(db: Audit) -> None:
    record_stored(db, "1.2.3", "1.2.3.1")
    record_stored(db, "1.2.3", "1.2.3.1")  # the same image stored twice (two listeners)
    record_stored(db, "4.5.6", "4.5.6.1")
    created = create_jobs(db, settle_seconds=0)
    assert sorted(is_new for _, is_new in created) == [True, True]
    assert create_jobs(db, settle_seconds=0) == []  # everything covered now
    record_stored(db, "1.2.3", "1.2.3.2")  # a late image
    ((late_job, is_new),) = create_jobs(db, settle_seconds=0)
    assert is_new
    jobs = _jobs(db)
    assert [(s, sops) for _, s, sops in jobs] == [
        ("1.2.3", ["1.2.3.1"]),
        ("4.5.6", ["4.5.6.1"]),
        ("1.2.3", ["1.2.3.2"]),
    ]
    assert db.job_state(late_job) == (JobState.QUEUED, 0)


def test_several_listeners_settling_the_same_studies_create_each_job_once(
    database_url: str, tmp_path: Path
) -> None:
    upgrade(database_url)
    writer = Audit.open(database_url)
    for study in range(10):
        for image in range(3):
            record_stored(writer, f"9.{study}", f"9.{study}.{image}")
    settings = make_settings(tmp_path, database_url=database_url, settle_seconds=0.0)
    queued: list[int] = []
    lock = threading.Lock()

    def enqueue(job_id: int) -> None:
        with lock:
            queued.append(job_id)

    loops = [
        SettleLoop(settings, Audit.open(database_url), enqueue, enqueue, lambda: None)
        for _ in range(4)
    ]
    barrier = threading.Barrier(len(loops))

    def settle(loop: SettleLoop) -> None:
        barrier.wait()
        loop.run_once()

    threads = [threading.Thread(target=settle, args=(loop,)) for loop in loops]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    jobs = _jobs(writer)
    assert len(jobs) == 10
    assert sorted(sops for _, _, sops in jobs) == [
        [f"9.{s}.{i}" for i in range(3)] for s in range(10)
    ]
    assert sorted(queued) == sorted(job_id for job_id, _, _ in jobs)  # each published once
    for loop in loops:
        loop.audit.close()
    writer.close()


def test_recovery_requeues_lost_jobs_and_unsent_items(db: Audit, tmp_path: Path) -> None:
    for n in range(4):
        record_stored(db, f"1.2.{n}", f"1.2.{n}.1")
    (queued, _), (running, _), (done, _), (busy, _) = create_jobs(db, settle_seconds=0)
    for job_id in (running, done, busy):
        db.job_state_changed(job_id, JobState.RUNNING, attempt=1)
    db.job_state_changed(done, JobState.SUCCEEDED, attempt=1)
    sent = db.outbox_item_added(destination="PACS@h:1", sop_instance_uid="9", sop_class_uid="1",
                                path="/x")  # fmt: skip
    unsent = db.outbox_item_added(destination="PACS@h:1", sop_instance_uid="8",
                                  sop_class_uid="1", path="/y")  # fmt: skip
    db.dispatch_attempted(sent, DispatchStatus.SENT)
    db.dispatch_attempted(unsent, DispatchStatus.FAILED, error="refused")
    settings = make_settings(tmp_path, database_url=str(db.engine.url.render_as_string(False)))
    with job_lock(settings, db, busy) as held:  # a live worker runs this one
        assert held
        # RUNNING without a live holder: lost. QUEUED: lost only if the queue is empty.
        assert lost_jobs(settings, db, analysis_queue_empty=False) == [running]
        assert lost_jobs(settings, db, analysis_queue_empty=True) == [running]  # too recent
        assert lost_jobs(settings, db, True, queued_grace_seconds=0) == [queued, running]
        analysis: list[int] = []
        dispatch: list[int] = []
        depths: dict[str, int] = {"analysis": 0, "dispatch": 0}
        loop = SettleLoop(settings, db, analysis.append, dispatch.append, lambda: depths)
        assert loop.recover() == (2, 1)
        assert (analysis, dispatch) == ([queued, running], [unsent])
        depths["analysis"] = 5  # the broker still holds queued messages: only the dead one
        analysis.clear()
        assert loop.recover() == (1, 1)
        assert analysis == [running]
    assert unsent_outbox_items(db) == [unsent]
    assert unsent_outbox_items(db, older_than_seconds=3600) == []  # attempted just now


def test_a_job_is_published_again_once_the_broker_is_back(db: Audit, tmp_path: Path) -> None:
    record_stored(db, "1.2.3", "1.2.3.1")
    published: list[int] = []
    broker_up = False

    def enqueue(job_id: int) -> None:
        if not broker_up:
            raise ConnectionRefusedError("broker down")
        published.append(job_id)

    settings = make_settings(tmp_path, settle_seconds=0.0)
    loop = SettleLoop(settings, db, enqueue, enqueue, lambda: None)
    (job_id,) = loop.run_once()
    assert published == []
    broker_up = True
    assert loop.run_once() == []
    assert published == [job_id]
    assert db.unfinished_jobs(JobKind.ANALYSE) == [(job_id, JobState.QUEUED, 0)]
