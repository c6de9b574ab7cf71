"""Batched first attempts: several queued jobs analysed together, each isolated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from boneflow.config import Settings
from boneflow.db.audit import Audit, JobKind, JobState
from boneflow.db.schema import Result
from boneflow.worker.app import ANALYSE_TASK, ANALYSIS_QUEUE, BoneflowCelery, create_app
from boneflow.worker.embedded import queue_depth
from boneflow.worker.tasks import run_analyse_task
from tests.worker.conftest import job_states, make_settings, record_stored


@pytest.fixture
def app(tmp_path: Path, model_dir: Path) -> Iterator[BoneflowCelery]:
    from boneflow.db.migrate import upgrade

    settings = make_settings(tmp_path / "data", settle_seconds=0.0, model_dir=model_dir)
    upgrade(settings.resolved_database_url)
    celery = create_app(settings)
    try:
        yield celery
    finally:
        celery.close_runtime()
        celery.close()


def _study(settings: Settings, audit: Audit, n: int, readable: bool = True) -> int:
    """A single-image study (RG3, shrunk) spooled and settled into a QUEUED job."""
    ds = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"))
    pixels = ds.pixel_array[::8, ::8].astype(np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = settings.data_dir / "spool" / f"{n}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    if readable:
        ds.save_as(path, enforce_file_format=True)
    study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    instance = record_stored(audit, study, sop, path=str(path))
    job_id, _ = audit.job_created(
        kind=JobKind.ANALYSE, key=f"analyse:{study}", payload={}, study_instance_uid=study,
        instances=[(sop, instance)],
    )  # fmt: skip
    return job_id


def _results(audit: Audit) -> list[tuple[int | None, str]]:
    with audit.session() as session:
        rows = session.execute(select(Result.job_id, Result.sop_instance_uid)).all()
    return [(job_id, str(uid)) for job_id, uid in rows]


def _reports(settings: Settings) -> list[Path]:
    return sorted(settings.results_dir.rglob("SR-*.dcm"))


def test_a_first_attempt_takes_the_queued_jobs_with_it(app: BoneflowCelery) -> None:
    settings, audit = app.settings, app.audit()
    jobs = [_study(settings, audit, n) for n in range(3)]
    run_analyse_task(app, app.tasks[ANALYSE_TASK], jobs[0])
    for job_id in jobs:
        assert job_states(audit, job_id) == [("queued", 0), ("running", 1), ("succeeded", 1)]
    assert sorted(job_id for job_id, _ in _results(audit)) == sorted(jobs)
    reports = _reports(settings)
    assert len(reports) == 3
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in reports}
    assert len(uids) == 3


def test_redelivered_messages_of_a_batch_change_nothing(app: BoneflowCelery) -> None:
    settings, audit = app.settings, app.audit()
    jobs = [_study(settings, audit, n) for n in range(3)]
    run_analyse_task(app, app.tasks[ANALYSE_TASK], jobs[0])
    before = ([job_states(audit, j) for j in jobs], _results(audit), _reports(settings))
    for job_id in [*jobs, jobs[0]]:  # the companions' own messages, the lead's again
        run_analyse_task(app, app.tasks[ANALYSE_TASK], job_id)
    assert ([job_states(audit, j) for j in jobs], _results(audit), _reports(settings)) == before


def test_a_bad_job_does_not_fail_the_batch_and_runs_again_alone(app: BoneflowCelery) -> None:
    settings, audit = app.settings, app.audit()
    good, bad, other = (_study(settings, audit, n, readable=n != 1) for n in range(3))
    queued = queue_depth(settings.data_dir, ANALYSIS_QUEUE)
    run_analyse_task(app, app.tasks[ANALYSE_TASK], good)
    assert audit.job_state(good) == (JobState.SUCCEEDED, 1)
    assert audit.job_state(other) == (JobState.SUCCEEDED, 1)
    assert audit.job_state(bad) == (JobState.RETRYING, 1)
    assert queue_depth(settings.data_dir, ANALYSIS_QUEUE) == queued + 1  # queued again
    run_analyse_task(app, app.tasks[ANALYSE_TASK], bad)  # its retry: alone
    assert job_states(audit, bad)[-2:] == [("running", 2), ("failed", 2)]
    assert job_states(audit, good) == [("queued", 0), ("running", 1), ("succeeded", 1)]
    assert len(_reports(settings)) == 2


def test_a_retry_runs_alone(app: BoneflowCelery) -> None:
    settings, audit = app.settings, app.audit()
    retried, waiting = (_study(settings, audit, n) for n in range(2))
    audit.job_state_changed(retried, JobState.RUNNING, attempt=1)  # its worker died
    run_analyse_task(app, app.tasks[ANALYSE_TASK], retried)
    assert audit.job_state(retried) == (JobState.SUCCEEDED, 2)
    assert job_states(audit, waiting) == [("queued", 0)]
