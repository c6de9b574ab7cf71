"""The spool: atomic create-if-absent across processes, crash safety, recovery."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

from boneflow.config import Settings
from boneflow.db.audit import Audit
from boneflow.db.migrate import upgrade
from boneflow.dicom.security import HeaderProblem, InstanceHeader, spool_relative_path
from boneflow.dicom.spool import RECOVERED_REASON, Spool, recover_spool

from .conftest import dcmtk, poll, radiograph

# A listener in its own process; KILL_BEFORE_AUDIT makes it SIGKILL itself after the file
# is fsync'd and linked into the spool but before the STORED audit row is written.
LISTENER_PROCESS = textwrap.dedent(
    """
    import os, signal, sys, threading
    from pathlib import Path
    from boneflow.config import Settings
    from boneflow.db.audit import Audit, InstanceStatus
    from boneflow.db.migrate import upgrade
    from boneflow.dicom.listener import start_listener

    data_dir, port_file, kill_before_audit = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    class Audit2(Audit):
        def instance_received(self, **fields):
            if kill_before_audit == "1" and fields["status"] == InstanceStatus.STORED:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().instance_received(**fields)

    settings = Settings(data_dir=data_dir, port=0, min_free_bytes=0, log_level="WARNING")
    upgrade(settings.resolved_database_url)
    audit = Audit2(Audit.open(settings.resolved_database_url).engine)
    handed_off = data_dir / "handed-off.txt"
    def on_stored(instance):
        with handed_off.open("a") as out:
            out.write(instance.sop_instance_uid + "\\n")
    handle = start_listener(settings, audit, on_stored)
    port_file.write_text(str(handle.port))
    threading.Event().wait()
    """
)


def start_listener_process(
    data_dir: Path, kill_before_audit: bool
) -> tuple[subprocess.Popen[bytes], int]:
    port_file = data_dir.parent / f"port-{os.urandom(4).hex()}"
    process = subprocess.Popen(
        [sys.executable, "-c", LISTENER_PROCESS, str(data_dir), str(port_file),
         "1" if kill_before_audit else "0"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    poll(lambda: port_file.exists() and port_file.read_text(), "the listener process", 30)
    return process, int(port_file.read_text())


def storescu(port: int, path: Path) -> subprocess.CompletedProcess[str]:
    return dcmtk("storescu", "-R", "-xe", "-aec", "BONEFLOW", "127.0.0.1", str(port), str(path))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=tmp_path / "data", port=0, min_free_bytes=0, log_level="WARNING")
    upgrade(settings.resolved_database_url)
    return settings


def test_sigkill_after_acknowledging_loses_nothing(settings: Settings) -> None:
    source = radiograph("RG3_UNCR.dcm")
    process, port = start_listener_process(settings.data_dir, kill_before_audit=False)
    try:
        assert storescu(port, source).returncode == 0  # acknowledged
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    audit = Audit.open(settings.resolved_database_url)
    try:
        stored = [e for e in audit.trail() if e.status == "stored"]
        assert len(stored) == 1
        path = settings.spool_dir / stored[0].study_instance_uid / "x"
        spooled = list(settings.spool_dir.rglob(f"{stored[0].sop_instance_uid}.dcm"))
        assert len(spooled) == 1 and spooled[0].parent.parent == path.parent
        assert pydicom.dcmread(spooled[0]).PixelData == pydicom.dcmread(source).PixelData
        assert audit.verify() == []
        assert recover_spool(settings, audit) == []  # the STORED row is the hand-off
    finally:
        audit.close()
    # After restart, a resend by the PACS is acknowledged as a duplicate, not queued again.
    process, port = start_listener_process(settings.data_dir, kill_before_audit=False)
    try:
        assert storescu(port, source).returncode == 0
    finally:
        process.terminate()
        process.wait(10)
    handed_off = (settings.data_dir / "handed-off.txt").read_text().split()
    assert handed_off == [stored[0].sop_instance_uid]


def test_sigkill_between_spool_and_audit_is_recovered_at_restart(settings: Settings) -> None:
    source = radiograph("RG1_UNCR.dcm")
    process, port = start_listener_process(settings.data_dir, kill_before_audit=True)
    try:
        assert storescu(port, source).returncode != 0  # killed before answering
        process.wait(10)
        assert process.returncode == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    spooled = list(Spool(settings.spool_dir).spooled_files())
    assert len(spooled) == 1  # on disk, complete, but not in the audit log
    audit = Audit.open(settings.resolved_database_url)
    try:
        assert [e.status for e in audit.trail() if e.event == "instance"] == []
        recovered = recover_spool(settings, audit)
        assert [r.path for r in recovered] == spooled
        sop_uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        assert recovered[0].sop_instance_uid == sop_uid
        assert recovered[0].instance_id is not None
        rows = [e for e in audit.trail() if e.event == "instance"]
        assert [(r.status, RECOVERED_REASON in r.detail) for r in rows] == [("stored", True)]
        assert recover_spool(settings, audit) == []  # once only
    finally:
        audit.close()
    # The PACS resends what it never saw acknowledged: a duplicate, not analysed twice.
    process, port = start_listener_process(settings.data_dir, kill_before_audit=False)
    try:
        assert storescu(port, source).returncode == 0
    finally:
        process.terminate()
        process.wait(10)
    assert not (settings.data_dir / "handed-off.txt").exists()


def test_recover_spool_removes_abandoned_partial_receptions(settings: Settings) -> None:
    spool = Spool(settings.spool_dir)
    partial = spool.incoming_dir / "tmpabandoned.dcm"
    partial.write_bytes(b"\0" * 1000)
    os.utime(partial, (0, 0))
    fresh = spool.incoming_dir / "tmpinflight.dcm"
    fresh.write_bytes(b"\0" * 10)
    audit = Audit.open(settings.resolved_database_url)
    try:
        assert recover_spool(settings, audit) == []
    finally:
        audit.close()
    assert not partial.exists()
    assert fresh.exists()  # maybe a running association's file


def _race(root: str, url: str, received: str, barrier: object, results: object) -> None:
    """One process storing the same instance as its rivals, at the same moment."""
    audit = Audit.open(url)
    ds = pydicom.dcmread(received, stop_before_pixels=True)
    header = InstanceHeader(
        str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID), str(ds.PatientID), 1, 1, 1,
    )  # fmt: skip
    copy = Path(received).with_name(f"{os.getpid()}.dcm")
    shutil.copyfile(received, copy)
    barrier.wait()  # type: ignore[attr-defined]
    outcome = Spool(Path(root)).store_file(copy, header, "1.2.840.10008.1.2.1", audit)
    results.put(outcome.is_new)  # type: ignore[attr-defined]
    audit.close()


def test_processes_racing_on_one_sop_instance_store_it_once(
    settings: Settings, tmp_path: Path
) -> None:
    received = tmp_path / "received.dcm"
    shutil.copyfile(radiograph("RG3_UNCR.dcm"), received)
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    args = (str(settings.spool_dir), settings.resolved_database_url, str(received))
    rivals = [context.Process(target=_race, args=(*args, barrier, results)) for _ in range(4)]
    for rival in rivals:
        rival.start()
    outcomes = sorted(results.get(timeout=60) for _ in rivals)
    for rival in rivals:
        rival.join(30)
        assert rival.exitcode == 0
    assert outcomes == [False, False, False, True]
    assert len(list(Spool(settings.spool_dir).spooled_files())) == 1
    audit = Audit.open(settings.resolved_database_url)
    try:
        statuses = sorted(e.status for e in audit.trail() if e.event == "instance")
    finally:
        audit.close()
    assert statuses == ["duplicate", "duplicate", "duplicate", "stored"]


@pytest.mark.parametrize("bad", ["../x", "1.2.3/..", "", "1..2", "1.2.3.", "a.b", "1" * 65])
def test_spool_paths_come_only_from_valid_uids(bad: str) -> None:
    header = InstanceHeader("1.2.3", "1.2", "1.2.4", "1.2.5", "", 1, 1, 1)
    assert spool_relative_path(header) == Path("1.2.4/1.2.5/1.2.3.dcm")
    for field in ("sop_instance_uid", "study_instance_uid", "series_instance_uid"):
        with pytest.raises(HeaderProblem):
            spool_relative_path(replace(header, **{field: bad}))
