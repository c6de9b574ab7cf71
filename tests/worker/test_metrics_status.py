"""``/metrics`` (scraped, parsed with prometheus_client's parser) and ``boneflow status``."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from boneflow.config import Settings
from boneflow.db.audit import Audit, DispatchStatus, InstanceStatus, JobState, ResultStatus
from boneflow.worker.app import ANALYSE_TASK, create_app
from boneflow.worker.metrics import start_metrics_server
from boneflow.worker.settle import create_jobs
from boneflow.worker.status import collect_status, status_command
from tests.conftest import free_port
from tests.worker.conftest import make_settings, record_stored


def _activity(audit: Audit) -> tuple[int, int]:
    record_stored(audit, "1.2.3", "1.2.3.1")
    record_stored(audit, "4.5.6", "4.5.6.1")
    audit.instance_received(status=InstanceStatus.REFUSED, reason="SOP class not accepted")
    (done, _), (failed, _) = create_jobs(audit, settle_seconds=0)
    audit.job_state_changed(done, JobState.RUNNING, attempt=1)
    audit.result_recorded(
        sop_instance_uid="1.2.3.1",
        status=ResultStatus.ANALYSED,
        job_id=done,
        timings_ms={"preprocess": 30.0, "router": 120.0, "fracture": 400.0},
    )
    audit.job_state_changed(done, JobState.SUCCEEDED, attempt=1)
    audit.job_state_changed(failed, JobState.RUNNING, attempt=1)
    audit.job_state_changed(failed, JobState.FAILED, attempt=1, detail="UnreadableInstance: x")
    item = audit.outbox_item_added(destination="PACS@h:1", sop_instance_uid="9",
                                   sop_class_uid="1", path="/x", job_id=done)  # fmt: skip
    audit.dispatch_attempted(item, DispatchStatus.FAILED, error="connection refused")
    audit.dispatch_attempted(item, DispatchStatus.SENT)
    return done, failed


def test_metrics_are_served_and_parse(settings: Settings, audit: Audit) -> None:
    _activity(audit)
    settings = make_settings(settings.data_dir, metrics_port=free_port())
    app = create_app(settings)
    app.tasks[ANALYSE_TASK].delay(999)  # one message waiting in the embedded queue
    server = start_metrics_server(settings, app, audit)
    assert server is not None
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        server.shutdown()
        app.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("boneflow_images_received_total", (("status", "stored"),))] == 2
    assert samples[("boneflow_images_received_total", (("status", "refused"),))] == 1
    assert samples[("boneflow_jobs", (("state", "succeeded"),))] == 1
    assert samples[("boneflow_jobs", (("state", "failed"),))] == 1
    assert samples[("boneflow_jobs", (("state", "running"),))] == 0
    assert samples[("boneflow_dispatch_failures_total", ())] == 1
    assert samples[("boneflow_queue_depth", (("queue", "analysis"),))] == 1
    assert samples[("boneflow_queue_depth", (("queue", "dispatch"),))] == 0
    assert samples[("boneflow_broker_up", ())] == 1
    assert samples[("boneflow_database_up", ())] == 1
    router = (("le", "0.25"), ("stage", "router"))
    assert samples[("boneflow_analysis_stage_seconds_bucket", router)] == 1
    assert (
        samples[("boneflow_analysis_stage_seconds_bucket", (("le", "0.1"), ("stage", "router")))]
        == 0
    )
    assert samples[("boneflow_analysis_stage_seconds_sum", (("stage", "fracture"),))] == 0.4
    assert samples[("boneflow_settle_to_done_seconds_count", (("kind", "analyse"),))] == 1


def test_a_taken_metrics_port_is_not_fatal(settings: Settings, audit: Audit) -> None:
    settings = make_settings(settings.data_dir, metrics_port=free_port())
    app = create_app(settings)
    first = start_metrics_server(settings, app, audit)
    assert first is not None
    try:
        assert start_metrics_server(settings, app, audit) is None
    finally:
        first.shutdown()


def test_status_reports_queues_jobs_failures_and_outbox(
    settings: Settings, audit: Audit, capsys: pytest.CaptureFixture[str]
) -> None:
    _done, failed = _activity(audit)
    status = collect_status(settings, audit, ping=False)
    assert status.broker_reachable
    assert status.queue_depths == {"analysis": 0, "dispatch": 0}
    assert status.jobs["succeeded"] == 1 and status.jobs["failed"] == 1
    assert status.in_flight == 0
    assert [(f.job_id, f.detail) for f in status.failed] == [(failed, "UnreadableInstance: x")]
    assert status.outbox["items"] == 1 and status.outbox["sent"] == 1
    assert status.outbox["pending"] == 0
    assert status_command(settings, as_json=True) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["workers"] == [] and printed["failed"][0]["job_id"] == failed
    assert status_command(settings, as_json=False) == 0
    assert "failed jobs (latest 1)" in capsys.readouterr().out


def test_status_says_when_the_broker_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    assert status_command(settings, as_json=False) == 1
    assert "UNREACHABLE" in capsys.readouterr().out
