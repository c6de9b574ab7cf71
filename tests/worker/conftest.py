"""Fixtures of the worker tests: settings in a temporary DATA_DIR, an audit database."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from boneflow.config import Settings
from boneflow.db.audit import Audit, InstanceStatus
from boneflow.db.migrate import upgrade
from boneflow.dicom.receiver import Receiver, start_receiver


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    """Settings for a node whose DATA_DIR is ``data_dir``."""
    return dataclasses.replace(Settings(data_dir=data_dir), **overrides)  # type: ignore[arg-type]


def record_stored(
    audit: Audit, study: str, sop: str, patient_id: str = "P1", path: str | None = None
) -> int:
    """Record a stored instance as the listener would."""
    return audit.instance_received(
        status=InstanceStatus.STORED,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        study_instance_uid=study,
        series_instance_uid=f"{study}.1",
        patient_id=patient_id,
        spool_path=path,
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings with a fresh DATA_DIR (SQLite) and the embedded broker."""
    return make_settings(tmp_path / "data", settle_seconds=0.0)


@pytest.fixture
def audit(settings: Settings) -> Iterator[Audit]:
    """The audit database of ``settings``, migrated."""
    upgrade(settings.resolved_database_url)
    opened = Audit.open(settings.resolved_database_url)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small real models, registered once for all the worker integration tests."""
    from tests.model_fixtures import make_test_models

    folder = tmp_path_factory.mktemp("models")
    make_test_models(folder)
    return folder


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    """A receiving node: the destination results are sent to."""
    node = start_receiver(tmp_path / "received", ae_title="DEST")
    try:
        yield node
    finally:
        node.stop()


def job_states(audit: Audit, job_id: int) -> list[tuple[str, int]]:
    """A job's audited states and attempts, oldest first."""
    from sqlalchemy import select

    from boneflow.db.schema import JobStateChange

    with audit.session() as session:
        rows = session.execute(
            select(JobStateChange.state, JobStateChange.attempt)
            .where(JobStateChange.job_id == job_id)
            .order_by(JobStateChange.id)
        ).all()
    return [(str(state), int(attempt)) for state, attempt in rows]
