"""LISTENER_PROCESSES > 1: several processes accept from one listening socket."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from boneflow.config import Settings
from boneflow.db.audit import Audit
from boneflow.db.migrate import upgrade
from boneflow.dicom.listener import start_listener
from boneflow.dicom.spool import StoredInstance

from .conftest import dcmtk, radiograph

pytestmark = pytest.mark.integration


def record(log_file: str, instance: StoredInstance) -> None:
    """The on_stored of the child processes: one line per hand-off, with the pid."""
    with open(log_file, "a") as out:
        out.write(f"{os.getpid()} {instance.sop_instance_uid}\n")


def test_two_processes_share_the_port_and_store_each_instance_once(
    ingest_settings: Settings, tmp_path: Path
) -> None:
    settings = replace(ingest_settings, listener_processes=2)
    upgrade(settings.resolved_database_url)
    files = []
    for index in range(16):
        ds = pydicom.dcmread(radiograph("RG1_J2KI.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        files.append(tmp_path / f"{index}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    files.append(files[0])  # one duplicate
    log_file = tmp_path / "handed-off.txt"
    audit = Audit.open(settings.resolved_database_url)
    handle = start_listener(settings, audit, partial(record, str(log_file)))
    try:
        assert handle.port > 0

        def send(path: Path) -> int:
            return dcmtk("storescu", "-R", "-xw", "-aec", "BONEFLOW", "127.0.0.1",
                         str(handle.port), str(path)).returncode  # fmt: skip

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(send, files)) == [0] * len(files)
    finally:
        handle.stop()
        assert handle.wait(20)
    lines = [line.split() for line in log_file.read_text().splitlines()]
    assert sorted(sop for _, sop in lines) == sorted(
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files[:-1]
    )
    assert len({pid for pid, _ in lines}) == 2  # both processes took associations
    statuses = sorted(e.status for e in audit.trail() if e.event == "instance")
    assert statuses == ["duplicate"] + ["stored"] * 16
    assert audit.verify() == []
    audit.close()


def test_the_port_is_bound_once_and_freed_on_stop(ingest_settings: Settings) -> None:
    settings = replace(ingest_settings, listener_processes=2)
    upgrade(settings.resolved_database_url)
    audit = Audit.open(settings.resolved_database_url)
    handle = start_listener(settings, audit, partial(record, os.devnull))
    try:
        with socket.socket() as intruder:  # no SO_REUSEPORT: nobody else gets the port
            intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError):
                intruder.bind(("127.0.0.1", handle.port))
        assert dcmtk("echoscu", "-aec", "BONEFLOW", "127.0.0.1", str(handle.port)).returncode == 0
    finally:
        handle.stop()
        assert handle.wait(20)
        audit.close()
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", handle.port))


def test_an_unpicklable_on_stored_is_refused_before_anything_starts(
    ingest_settings: Settings,
) -> None:
    settings = replace(ingest_settings, listener_processes=2)
    audit = Audit.open(settings.resolved_database_url)
    with pytest.raises(TypeError, match="picklable"):
        start_listener(settings, audit, lambda instance: None)
    audit.close()
