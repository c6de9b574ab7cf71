"""At-least-once analysis against a real Redis: killed workers, a lost broker, two listeners.

Every test runs the real thing: ``boneflow listen`` and ``boneflow worker`` as processes,
a private ``redis-server``, the real pipeline with small registered models, and a
receiving node as the destination. "Exactly one set of results" means one SR and one SC
per analysed image at the destination, and one result row per image in the audit log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from boneflow.config import Destination, Settings
from boneflow.db.audit import Audit, JobKind, JobState
from boneflow.db.migrate import upgrade
from boneflow.db.schema import JobStateChange
from boneflow.dicom.receiver import Receiver
from tests.conftest import RedisServer, free_port, wait_for
from tests.worker.nodes import (
    BoneflowProcess,
    jobs_of,
    make_study,
    received,
    result_rows,
    send,
    wait_for_echo,
    wait_for_results,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def node_settings(
    tmp_path: Path, model_dir: Path, receiver: Receiver, redis_server: RedisServer
) -> Settings:
    """A node on Redis with SQLite in DATA_DIR, sending to ``receiver``."""
    settings = Settings(
        data_dir=tmp_path / "data",
        model_dir=model_dir,
        port=free_port(),
        broker_url=redis_server.url,
        settle_seconds=0.5,
        destinations=(Destination("dimse", "DEST", "127.0.0.1", receiver.port),),
    )
    upgrade(settings.resolved_database_url)
    return settings


@pytest.fixture
def processes() -> Iterator[list[BoneflowProcess]]:
    """Processes a test starts; all are killed at the end."""
    started: list[BoneflowProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.close()


def _start(
    processes: list[BoneflowProcess], settings: Settings, tmp_path: Path, *args: str
) -> BoneflowProcess:
    process = BoneflowProcess(args, settings, tmp_path / f"{args[0]}-{len(processes)}.log")
    processes.append(process)
    return process


def _start_listener(
    processes: list[BoneflowProcess], settings: Settings, tmp_path: Path
) -> BoneflowProcess:
    listener = _start(processes, settings, tmp_path, "listen")
    wait_for_echo(settings, listener)
    return listener


def _start_worker(
    processes: list[BoneflowProcess], settings: Settings, tmp_path: Path
) -> BoneflowProcess:
    return _start(processes, settings, tmp_path, "worker", "--queues", "analysis,dispatch")


def test_a_worker_killed_mid_task_runs_it_again_and_results_arrive_once(
    node_settings: Settings,
    receiver: Receiver,
    processes: list[BoneflowProcess],
    tmp_path: Path,
) -> None:
    audit = Audit.open(node_settings.resolved_database_url)
    _start_listener(processes, node_settings, tmp_path)
    worker = _start_worker(processes, node_settings, tmp_path)
    study = make_study(6)
    study_uid = str(study[0].StudyInstanceUID)
    send(node_settings, study)

    def running() -> bool:
        jobs = jobs_of(audit, study_uid)
        return bool(jobs) and jobs[0][1] == JobState.RUNNING

    wait_for(running, "the analyse job to start", 120)
    worker.kill_group()  # SIGKILL, mid-task: the worker and its pool process
    ((job_id, state, attempt),) = jobs_of(audit, study_uid)
    assert (state, attempt) == (JobState.RUNNING, 1)
    assert received(receiver, study_uid) == (0, 0)

    worker = _start_worker(processes, node_settings, tmp_path)
    wait_for_results(receiver, study_uid, len(study), worker)
    wait_for(lambda: audit.job_state(job_id) == (JobState.SUCCEEDED, 2), "job success", 60)
    assert received(receiver, study_uid) == (1, len(study))
    assert result_rows(audit, study_uid) == len(study)
    assert len(jobs_of(audit, study_uid)) == 1
    audit.close()


def test_a_job_that_kills_its_worker_every_time_is_failed_after_n_attempts(
    node_settings: Settings, processes: list[BoneflowProcess], tmp_path: Path
) -> None:
    from boneflow.worker.app import MAX_ANALYSIS_ATTEMPTS

    audit = Audit.open(node_settings.resolved_database_url)
    job_id, _ = audit.job_created(kind=JobKind.ANALYSE, key="poison", payload={})
    for attempt in range(1, MAX_ANALYSIS_ATTEMPTS + 1):  # as if a worker died each time
        audit.job_state_changed(job_id, JobState.RUNNING, attempt=attempt)
    worker = _start_worker(processes, node_settings, tmp_path)  # recovery queues it again
    wait_for(
        lambda: (s := audit.job_state(job_id)) is not None and s[0] == JobState.FAILED,
        f"the poison job to fail\n{worker.log_tail()}",
        120,
    )
    with audit.session() as session:
        detail = session.scalar(
            select(JobStateChange.detail)
            .where(JobStateChange.job_id == job_id)
            .order_by(JobStateChange.id.desc())
        )
    assert detail is not None and f"after {MAX_ANALYSIS_ATTEMPTS} attempts" in detail
    audit.close()


def test_redis_restarted_while_jobs_are_queued_loses_nothing(
    node_settings: Settings,
    receiver: Receiver,
    redis_server: RedisServer,
    processes: list[BoneflowProcess],
    tmp_path: Path,
) -> None:
    audit = Audit.open(node_settings.resolved_database_url)
    listener = _start_listener(processes, node_settings, tmp_path)
    studies = [make_study(1, patient_id=f"BF-{n}") for n in range(3)]
    for study in studies:
        send(node_settings, study)
    uids = [str(s[0].StudyInstanceUID) for s in studies]
    wait_for(lambda: all(jobs_of(audit, uid) for uid in uids), "three queued jobs", 60)
    import redis

    client = redis.Redis(port=redis_server.port)
    wait_for(lambda: client.llen("analysis") == 3, "three messages in Redis", 30)
    client.close()
    redis_server.restart()  # no persistence: the queue is gone
    assert redis.Redis(port=redis_server.port).llen("analysis") == 0
    late = make_study(1, patient_id="BF-late")  # and the node goes on receiving meanwhile
    send(node_settings, late)
    worker = _start_worker(processes, node_settings, tmp_path)
    for uid, study in [*zip(uids, studies, strict=True), (str(late[0].StudyInstanceUID), late)]:
        wait_for_results(receiver, uid, len(study), worker)
        assert received(receiver, uid) == (1, len(study))
    assert listener.running
    audit.close()


def test_two_listeners_settling_the_same_study_analyse_it_once(
    node_settings: Settings,
    receiver: Receiver,
    processes: list[BoneflowProcess],
    tmp_path: Path,
    postgres_url: str,
) -> None:
    settings = dataclasses.replace(node_settings, database_url=postgres_url, settle_seconds=2.0)
    upgrade(postgres_url)
    other = dataclasses.replace(settings, port=free_port())
    _start_listener(processes, settings, tmp_path)
    _start_listener(processes, other, tmp_path)
    study = make_study(4)
    study_uid = str(study[0].StudyInstanceUID)
    send(settings, study[:2])
    send(other, study[2:])  # the PACS spreads one study over both listeners
    send(other, study[:1])  # and repeats an image on the other one
    worker = _start_worker(processes, settings, tmp_path)
    wait_for_results(receiver, study_uid, len(study), worker)
    audit = Audit.open(postgres_url)
    jobs = jobs_of(audit, study_uid)
    assert len(jobs) == 1 and jobs[0][1] == JobState.SUCCEEDED
    assert received(receiver, study_uid) == (1, len(study))
    assert result_rows(audit, study_uid) == len(study)
    audit.close()
