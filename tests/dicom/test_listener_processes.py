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
from boneflow.dicom.listener import _DEFER_SECONDS, _Siblings, start_listener
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


def test_parallel_associations_are_spread_evenly_over_the_processes(
    ingest_settings: Settings, tmp_path: Path
) -> None:
    settings = replace(ingest_settings, listener_processes=2)
    upgrade(settings.resolved_database_url)
    shares: list[list[Path]] = [[] for _ in range(4)]
    source = pydicom.dcmread(radiograph("RG3_UNCR.dcm"))
    for index in range(16):  # 6.7 MB each: the four associations overlap
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        shares[index % 4].append(tmp_path / f"{index}.dcm")
        source.save_as(shares[index % 4][-1], enforce_file_format=True)
    log_file = tmp_path / "handed-off.txt"
    audit = Audit.open(settings.resolved_database_url)
    handle = start_listener(settings, audit, partial(record, str(log_file)))
    try:

        def send(share: list[Path]) -> int:
            return dcmtk("storescu", "-R", "-xe", "-aec", "BONEFLOW", "127.0.0.1",
                         str(handle.port), *map(str, share)).returncode  # fmt: skip

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(send, shares)) == [0] * 4
    finally:
        handle.stop()
        assert handle.wait(20)
        audit.close()
    process_of = dict(reversed(line.split()) for line in log_file.read_text().splitlines())
    senders_of: dict[str, set[int]] = {}
    for number, share in enumerate(shares):
        for path in share:
            sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            senders_of.setdefault(process_of[sop], set()).add(number)
    assert len(senders_of) == 2  # (exactly 2 + 2 is the usual outcome, not a guarantee)


def test_a_busier_process_leaves_a_waiting_connection_to_a_less_busy_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loads = [0, 0]
    first, second = _Siblings(loads, 0), _Siblings(loads, 1)
    first.defer_to_a_less_busy_one()  # equal: take it
    first.count(+1)
    clock = [100.0]
    monkeypatch.setattr("boneflow.dicom.listener.time.monotonic", lambda: clock[0])
    with pytest.raises(BlockingIOError):
        first.defer_to_a_less_busy_one()  # 1 > 0: leave it to the other
    second.defer_to_a_less_busy_one()  # the least busy takes it
    second.count(+1)
    first.count(+1)
    assert loads == [2, 1]
    while clock[0] - 100.0 <= _DEFER_SECONDS:  # the other does not take it...
        with pytest.raises(BlockingIOError):
            first.defer_to_a_less_busy_one()
        clock[0] += 0.005  # (the accept loop comes back every millisecond or so)
    first.defer_to_a_less_busy_one()  # ...so after a while the busier one takes it anyway
    first.count(-2)
    assert loads == [0, 1]
