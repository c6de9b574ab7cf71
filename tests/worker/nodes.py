"""Helpers of the worker integration tests: boneflow processes, studies, destinations.

Nodes run as real subprocesses (``boneflow listen``, ``worker``, ``serve``) in their own
process group, so a test can SIGKILL a whole worker the way an OOM killer would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import func, select

from boneflow.config import Settings
from boneflow.db.audit import Audit, JobState
from boneflow.db.schema import Job, Result
from boneflow.dicom.receiver import Receiver
from tests.conftest import wait_for

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def node_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a boneflow command run with ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEFLOW_")}
    values: dict[str, object] = {
        "AE_TITLE": settings.ae_title,
        "HOST": settings.host,
        "PORT": settings.port,
        "DESTINATIONS": ",".join(str(d) for d in settings.destinations),
        "DATA_DIR": settings.data_dir.resolve(),
        "DATABASE_URL": settings.database_url,
        "BROKER_URL": settings.broker_url,
        "MODEL_DIR": settings.resolved_model_dir.resolve(),
        "DEVICE": "cpu",
        "SETTLE_SECONDS": settings.settle_seconds,
        "METRICS_PORT": settings.metrics_port,
        "LOG_LEVEL": "INFO",
    }
    env.update({f"BONEFLOW_{k}": str(v) for k, v in values.items()})
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


class BoneflowProcess:
    """One ``boneflow`` command running as its own process group, logging to a file."""

    def __init__(self, args: Sequence[str], settings: Settings, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "boneflow", *args],
            env=node_env(settings),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def running(self) -> bool:
        """True while the main process lives."""
        return self.process.poll() is None

    def kill_group(self) -> None:
        """SIGKILL the whole process group (main process and its workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def terminate(self, timeout_seconds: float = 60.0) -> int:
        """SIGTERM the main process and wait; returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout_seconds)
        return int(self.process.returncode)

    def close(self) -> None:
        """Make sure nothing of it is left running."""
        if self.process.poll() is None:
            self.kill_group()
        else:
            with contextlib.suppress(ProcessLookupError):  # children it may have left
                os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()

    def log_tail(self, lines: int = 40) -> str:
        """The end of its log, for assertion messages."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_for_echo(settings: Settings, process: BoneflowProcess, seconds: float = 120.0) -> None:
    """Wait until the node answers C-ECHO (it has started listening)."""

    def answers() -> bool:
        if not process.running:
            raise AssertionError(f"node exited early:\n{process.log_tail()}")
        try:  # pynetdicom leaks a socket when it cannot connect: probe with our own first
            socket.create_connection(("127.0.0.1", settings.port), timeout=1).close()
        except OSError:
            return False
        ae = AE(ae_title="TESTER")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return bool(status) and int(status.Status) == 0

    wait_for(answers, f"{settings.ae_title} on port {settings.port}", seconds)


def make_study(images: int, patient_id: str = "BF-TEST-1", shrink: int = 4) -> list[Dataset]:
    """A study of ``images`` copies of the real CR radiograph RG3, with fresh UIDs.

    The pixels are subsampled by ``shrink`` to keep tests quick (still a real radiograph).
    """
    source = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"))
    pixels = source.pixel_array[::shrink, ::shrink].astype(np.uint16)
    study_uid, series_uid = generate_uid(), generate_uid()
    datasets = []
    for number in range(1, images + 1):
        ds = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"))
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PatientID = patient_id
        ds.InstanceNumber = number
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        datasets.append(ds)
    return datasets


def send(settings: Settings, datasets: Sequence[Dataset], port: int | None = None) -> None:
    """C-STORE ``datasets`` to the node; every status must be success."""
    ae = AE(ae_title="TESTER")
    ae.add_requested_context(CR_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port or settings.port, ae_title=settings.ae_title)
    assert assoc.is_established, "the node refused the association"
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status and int(status.Status) == 0, f"C-STORE status {status}"
    finally:
        assoc.release()


def received(receiver: Receiver, study_uid: str) -> tuple[int, int]:
    """(SRs, other objects) of a study that reached ``receiver``."""
    objects = [r for r in receiver.received() if r.study_instance_uid == study_uid]
    srs = sum(1 for r in objects if r.sop_class_uid == COMPREHENSIVE_SR)
    return srs, len(objects) - srs


def jobs_of(audit: Audit, study_uid: str) -> list[tuple[int, JobState, int]]:
    """The jobs of a study: (job id, current state, attempt)."""
    with audit.session() as session:
        ids = list(session.scalars(select(Job.id).where(Job.study_instance_uid == study_uid)))
    states = [audit.job_state(job_id) for job_id in ids]
    return [(job_id, s[0], s[1]) for job_id, s in zip(ids, states, strict=True) if s]


def result_rows(audit: Audit, study_uid: str) -> int:
    """How many result rows the audit log holds for a study."""
    with audit.session() as session:
        return int(
            session.scalar(
                select(func.count(Result.id)).where(Result.study_instance_uid == study_uid)
            )
            or 0
        )


def wait_for_results(
    receiver: Receiver, study_uid: str, images: int, worker: BoneflowProcess
) -> None:
    """Wait until one SR and ``images`` SCs of the study reached ``receiver``."""

    def arrived() -> bool:
        if not worker.running:
            raise AssertionError(f"worker exited:\n{worker.log_tail()}")
        srs, others = received(receiver, study_uid)
        return srs >= 1 and others >= images

    try:
        wait_for(arrived, f"1 SR and {images} SCs of study {study_uid}", 240)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nworker log:\n{worker.log_tail()}") from None
