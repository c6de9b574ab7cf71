"""``boneflow serve`` on the embedded broker: the round trip, a SIGKILL, a clean shutdown.

No Redis: the queue lives in DATA_DIR/broker. The same task code as production runs in
the worker processes ``serve`` starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from boneflow.config import Destination, Settings
from boneflow.db.audit import Audit, JobState
from boneflow.db.migrate import upgrade
from boneflow.dicom.receiver import Receiver
from tests.conftest import free_port, wait_for
from tests.worker.nodes import (
    COMPREHENSIVE_SR,
    BoneflowProcess,
    jobs_of,
    make_study,
    node_env,
    received,
    result_rows,
    send,
    wait_for_echo,
    wait_for_results,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def serve_settings(tmp_path: Path, model_dir: Path, receiver: Receiver) -> Settings:
    settings = Settings(
        data_dir=tmp_path / "data",
        model_dir=model_dir,
        port=free_port(),
        metrics_port=free_port(),
        settle_seconds=0.5,
        destinations=(Destination("dimse", "DEST", "127.0.0.1", receiver.port),),
    )
    upgrade(settings.resolved_database_url)
    return settings


def test_serve_round_trip_survives_sigkill_and_stops_cleanly(
    serve_settings: Settings, receiver: Receiver, tmp_path: Path
) -> None:
    audit = Audit.open(serve_settings.resolved_database_url)
    node = BoneflowProcess(["serve"], serve_settings, tmp_path / "serve-1.log")
    try:
        wait_for_echo(serve_settings, node)
        first = make_study(2)
        send(serve_settings, first)
        wait_for_results(receiver, str(first[0].StudyInstanceUID), 2, node)

        # SIGKILL the whole tree while it analyses the next study.
        second = make_study(6)
        uid = str(second[0].StudyInstanceUID)
        send(serve_settings, second)

        def running() -> bool:
            jobs = jobs_of(audit, uid)
            return bool(jobs) and jobs[0][1] == JobState.RUNNING

        wait_for(running, "the second job to start", 120)
        node.kill_group()
        node.close()
        assert received(receiver, uid) == (0, 0)

        node = BoneflowProcess(["serve"], serve_settings, tmp_path / "serve-2.log")
        wait_for_echo(serve_settings, node)
        wait_for_results(receiver, uid, len(second), node)
        ((job_id, _state, _attempt),) = jobs_of(audit, uid)
        wait_for(lambda: audit.job_state(job_id) == (JobState.SUCCEEDED, 2), "job success", 60)
        assert received(receiver, uid) == (1, len(second))
        assert received(receiver, str(first[0].StudyInstanceUID)) == (1, 2)
        assert result_rows(audit, uid) == len(second)

        # A late image of the first study: a new job, whose SR supersedes the first SR.
        first_uid = str(first[0].StudyInstanceUID)
        (late,) = make_study(1, patient_id=str(first[0].PatientID))
        late.StudyInstanceUID = first_uid
        send(serve_settings, [late])
        wait_for(lambda: received(receiver, first_uid) == (2, 3), "the late image's results", 120)
        reports = sorted(
            (r for r in receiver.received()
             if r.study_instance_uid == first_uid and r.sop_class_uid == COMPREHENSIVE_SR),
            key=lambda r: r.path.stat().st_mtime,
        )  # fmt: skip
        newer = pydicom.dcmread(reports[1].path)
        (predecessor,) = newer.PredecessorDocumentsSequence
        referenced = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == reports[0].sop_instance_uid

        url = f"http://127.0.0.1:{serve_settings.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples[("boneflow_images_received_total", (("status", "stored"),))] == 9
        assert samples[("boneflow_jobs", (("state", "succeeded"),))] == 3
        assert samples[("boneflow_broker_up", ())] == 1

        status = subprocess.run(
            [sys.executable, "-m", "boneflow", "status", "--json"],
            env=node_env(serve_settings), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert sorted(w.split(".")[0] for w in report["workers"]) == ["analysis", "dispatch"]
        assert report["queue_depths"] == {"analysis": 0, "dispatch": 0}
        assert report["jobs"]["succeeded"] == 3 and report["in_flight"] == 0
        assert report["outbox"]["pending"] == 0 and report["outbox"]["sent"] == 3 + 7 + 2

        assert node.terminate(timeout_seconds=60) == 0  # SIGTERM: a clean shutdown
    finally:
        node.close()
        audit.close()


def test_a_burst_killed_mid_batch_gives_each_study_one_set_of_results(
    serve_settings: Settings, receiver: Receiver, tmp_path: Path
) -> None:
    from sqlalchemy import select

    from boneflow.db.schema import JobStateChange

    audit = Audit.open(serve_settings.resolved_database_url)
    node = BoneflowProcess(["serve"], serve_settings, tmp_path / "serve-1.log")
    studies = [make_study(1, patient_id=f"BURST-{n}", shrink=2) for n in range(20)]
    uids = [str(study[0].StudyInstanceUID) for study in studies]
    try:
        wait_for_echo(serve_settings, node)
        send(serve_settings, [study[0] for study in studies])  # one association, a burst

        def batch_running() -> bool:
            with audit.session() as session:
                rows = session.execute(
                    select(JobStateChange.job_id, JobStateChange.detail).where(
                        JobStateChange.state == str(JobState.RUNNING)
                    )
                ).all()
            return any("in a batch" in (detail or "") for _, detail in rows) and any(
                audit.job_state(job_id) == (JobState.RUNNING, 1) for job_id, _ in rows
            )

        wait_for(batch_running, "a batch of jobs to run", 180)
        node.kill_group()  # SIGKILL the whole tree mid-batch
        node.close()

        node = BoneflowProcess(["serve"], serve_settings, tmp_path / "serve-2.log")
        wait_for_echo(serve_settings, node)
        for uid in uids:
            wait_for_results(receiver, uid, 1, node)
        for uid in uids:
            ((job_id, _state, _attempt),) = jobs_of(audit, uid)
            wait_for(lambda j=job_id: audit.job_state(j)[0] == JobState.SUCCEEDED, "success", 60)
            assert received(receiver, uid) == (1, 1), uid  # one SR, one SC
            assert result_rows(audit, uid) == 1, uid
        objects = [r for r in receiver.received() if r.study_instance_uid in set(uids)]
        assert len({r.sop_instance_uid for r in objects}) == len(objects) == 2 * len(uids)
        assert node.terminate(timeout_seconds=60) == 0
    finally:
        node.close()
        audit.close()
