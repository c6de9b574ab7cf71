"""The audit API: append-only rows, idempotent jobs, and a hash chain that shows tampering."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from sqlalchemy import create_engine, text

from boneflow.db.audit import (
    Audit,
    DispatchStatus,
    InstanceStatus,
    JobKind,
    JobState,
    ResultStatus,
    TrailFilter,
)
from boneflow.db.migrate import upgrade


@pytest.fixture
def audit(database_url: str):
    upgrade(database_url)
    audit = Audit.open(database_url)
    yield audit
    audit.close()


def _fill(audit: Audit) -> dict[str, int]:
    assoc = audit.association_opened(
        calling_ae_title="PACS",
        called_ae_title="BONEFLOW",
        peer_address="127.0.0.1",
        peer_port=40000,
        accepted=True,
    )
    refused = audit.association_opened(
        calling_ae_title="EVIL",
        called_ae_title="BONEFLOW",
        peer_address="127.0.0.1",
        peer_port=40001,
        accepted=False,
        reason="calling AE title not allowed",
    )
    instance = audit.instance_received(
        status=InstanceStatus.STORED,
        association_id=assoc,
        sop_instance_uid="1.2.3.4",
        study_instance_uid="1.2.3",
        patient_id="P1",
        size_bytes=1234,
    )
    job, created = audit.job_created(
        kind=JobKind.ANALYSE,
        key="analyse:1.2.3:1",
        payload={"study": "1.2.3"},
        study_instance_uid="1.2.3",
        patient_id="P1",
        instances=[("1.2.3.4", instance)],
    )
    assert created
    audit.job_state_changed(job, JobState.RUNNING, attempt=1)
    result = audit.result_recorded(
        sop_instance_uid="1.2.3.4",
        status=ResultStatus.ANALYSED,
        job_id=job,
        study_instance_uid="1.2.3",
        body_part="wrist",
        body_part_confidence=0.99,
        fracture_probability=0.873,
        fracture_present=True,
        threshold=0.4,
        models={"router": "router@1", "fracture": "fracture-upper@1"},
        timings_ms={"router": 12.5},
    )
    item = audit.outbox_item_added(
        destination="PACS@127.0.0.1:104",
        sop_instance_uid="1.2.3.9",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
        path="outbox/x.dcm",
        study_instance_uid="1.2.3",
        job_id=job,
    )
    audit.dispatch_attempted(item, DispatchStatus.FAILED, error="connection refused")
    audit.dispatch_attempted(item, DispatchStatus.SENT)
    audit.job_state_changed(job, JobState.SUCCEEDED, attempt=1)
    return {"refused": refused, "instance": instance, "job": job, "result": result, "item": item}


def test_events_are_chained_and_verify_clean(audit: Audit) -> None:
    ids = _fill(audit)
    assert audit.verify() == []
    seq, head = audit.head()
    assert seq >= 10 and len(head) == 64
    assert audit.job_state(ids["job"]) == (JobState.SUCCEEDED, 1)
    assert audit.unfinished_jobs() == []


def test_job_creation_is_idempotent_by_key(audit: Audit) -> None:
    first = audit.job_created(kind=JobKind.ANALYSE, key="k", payload={}, study_instance_uid="9")
    second = audit.job_created(kind=JobKind.ANALYSE, key="k", payload={}, study_instance_uid="9")
    assert first[1] is True and second == (first[0], False)
    assert audit.unfinished_jobs(JobKind.ANALYSE) == [(first[0], JobState.QUEUED, 0)]
    assert audit.job_state_counts() == {"queued": 1}


def test_concurrent_appends_keep_one_chain(audit: Audit) -> None:
    def append(n: int) -> None:
        for i in range(15):
            audit.instance_received(status=InstanceStatus.STORED, sop_instance_uid=f"1.{n}.{i}")

    threads = [threading.Thread(target=append, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert audit.head()[0] == 60
    assert audit.verify() == []


def test_trail_filters(audit: Audit) -> None:
    _fill(audit)
    audit.instance_received(
        status=InstanceStatus.STORED,
        sop_instance_uid="5.5",
        study_instance_uid="5",
        patient_id="P2",
    )
    by_patient = audit.trail(TrailFilter(patient_id="P1"))
    assert by_patient and all(e.study_instance_uid in {"1.2.3", None} for e in by_patient)
    assert {e.event for e in by_patient} >= {"instance", "job", "job_state", "result", "dispatch"}
    refused = audit.trail(TrailFilter(status="refused"))
    assert [e.event for e in refused] == ["association"]
    assert "not allowed" in refused[0].detail
    assert [e.sop_instance_uid for e in audit.trail(TrailFilter(study_instance_uid="5"))] == ["5.5"]


def _execute(database_url: str, *statements: str) -> None:
    engine = create_engine(database_url)
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement))
    engine.dispose()


def test_edited_row_is_detected(audit: Audit, database_url: str) -> None:
    ids = _fill(audit)
    _execute(
        database_url,
        f"UPDATE results SET fracture_probability = 0.01 WHERE id = {ids['result']}",
    )
    problems = audit.verify()
    assert [(p.table, p.row_id) for p in problems] == [("results", ids["result"])]
    assert "content" in problems[0].problem


def test_deleted_row_is_detected(audit: Audit, database_url: str) -> None:
    ids = _fill(audit)
    _execute(database_url, f"DELETE FROM associations WHERE id = {ids['refused']}")
    problems = audit.verify()
    assert any(p.row_id == ids["refused"] + 1 and "missing" in p.problem for p in problems)


def test_reordered_rows_are_detected(audit: Audit, database_url: str) -> None:
    ids = _fill(audit)
    # Swap the times of two rows, as one would to make an event look earlier.
    _execute(
        database_url,
        "UPDATE dispatch_attempts SET recorded_at = "
        "(SELECT recorded_at FROM associations WHERE id = 1) "
        f"WHERE outbox_item_id = {ids['item']}",
    )
    problems = audit.verify()
    assert problems and all(p.table == "dispatch_attempts" for p in problems)


def test_swapped_rows_are_detected(audit: Audit, database_url: str) -> None:
    _fill(audit)
    a = audit.instance_received(status=InstanceStatus.STORED, sop_instance_uid="7.1")
    b = audit.instance_received(status=InstanceStatus.STORED, sop_instance_uid="7.2")
    _execute(
        database_url,
        f"UPDATE instances SET id = -1 WHERE id = {a}",
        f"UPDATE instances SET id = {a} WHERE id = {b}",
        f"UPDATE instances SET id = {b} WHERE id = -1",
    )
    problems = audit.verify()
    assert {p.row_id for p in problems} >= {a, b}


def _append_from_process(database_url: str, n: int) -> None:
    audit = Audit.open(database_url)
    for i in range(20):
        audit.instance_received(status=InstanceStatus.STORED, sop_instance_uid=f"2.{n}.{i}")
    audit.close()


def test_several_processes_append_to_one_chain(audit: Audit, database_url: str) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_append_from_process, args=(database_url, n)) for n in range(3)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    assert audit.head()[0] == 60
    assert audit.verify() == []


def test_stored_instance_id_is_a_plain_read_beside_a_writer(
    audit: Audit, database_url: str
) -> None:
    stored = audit.instance_received(status=InstanceStatus.STORED, sop_instance_uid="1.2.3")
    audit.instance_received(status=InstanceStatus.DUPLICATE, sop_instance_uid="1.2.3")
    audit.instance_received(status=InstanceStatus.REFUSED, sop_instance_uid="1.2.4")
    assert audit.stored_instance_id("1.2.3") == stored
    assert audit.stored_instance_id("1.2.4") is None
    if not database_url.startswith("sqlite:///"):
        return
    writer = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # another process in the middle of an append
        started = time.monotonic()
        assert audit.stored_instance_id("1.2.3") == stored  # not waiting for the writer
        assert time.monotonic() - started < 1.0
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert audit.verify() == []
