"""What an unauthenticated peer can make the listener spend: bounded, cut off, audited."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from boneflow.config import Destination
from boneflow.dicom.send import store_datasets
from boneflow.errors import DestinationUnavailable

from .conftest import RunningListener, dataset_bytes, dcmtk, poll, radiograph, rss_bytes

pytestmark = pytest.mark.integration


def associate(port: int) -> object:
    ae = AE(ae_title="HOSTILE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="BONEFLOW")
    assert assoc.is_established
    return assoc


def store_one(port: int) -> int:
    """A well-behaved sender: storescu with a real radiograph under a new UID."""
    done = dcmtk(
        "storescu", "-aec", "BONEFLOW", "+sd", "-R", "-xe", "127.0.0.1", str(port),
        str(radiograph("RG3_UNCR.dcm")),
    )  # fmt: skip
    return done.returncode


def big_instance(folder: Path, rows: int, columns: int, declared: tuple[int, int] | None) -> Path:
    """A CR file with real pixel bytes of ``rows x columns``; the header may declare more."""
    ds = pydicom.dcmread(radiograph("RG1_UNCR.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = declared or (rows, columns)
    ds.PixelData = np.full((rows, columns), 1000, dtype=np.uint16).tobytes()
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_declared_4_gib_pdu_is_cut_off_at_once(listener: RunningListener) -> None:
    assoc = associate(listener.port)
    raw = assoc.dul.socket.socket
    before = rss_bytes()
    started = time.monotonic()
    raw.sendall(b"\x04\x00\xff\xff\xff\xff" + b"\x00" * 64)
    poll(lambda: not assoc.is_established, "the association to be aborted", 10)
    raw.close()  # pynetdicom leaves a reset socket unclosed
    assert time.monotonic() - started < 3
    assert rss_bytes() - before < 32 * 2**20
    assert store_one(listener.port) == 0  # others are still served
    refused = listener.instances("refused")
    assert len(refused) == 1 and "PDU of 4294967295 bytes exceeds" in refused[0].detail


def test_huge_association_request_pdu_is_cut_off(listener: RunningListener) -> None:
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as raw:
        raw.sendall(b"\x01\x00\xff\xff\xff\xf0" + b"\x00" * 1024)
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):  # closed without an answer
            assert raw.recv(64) == b""
        assert time.monotonic() - started < 5
    assert store_one(listener.port) == 0


def test_unfinished_fragment_is_cut_off_by_the_network_timeout(
    listener: RunningListener,
) -> None:
    timeout = listener.settings.network_timeout_seconds
    assoc = associate(listener.port)
    raw = assoc.dul.socket.socket
    # A P-DATA PDU that promises 16 KB and delivers 100 bytes, then nothing.
    raw.sendall(b"\x04\x00\x00\x00\x40\x00" + b"\x00" * 100)
    started = time.monotonic()
    result: list[int] = []
    other = threading.Thread(target=lambda: result.append(store_one(listener.port)))
    other.start()  # served while the stalled peer waits to be cut off
    poll(lambda: not assoc.is_established, "the stalled association to be cut off", 30)
    elapsed = time.monotonic() - started
    raw.close()
    other.join(60)
    assert result == [0]
    assert timeout - 0.5 <= elapsed <= timeout + 5
    assert len(listener.stored) == 1


def test_silent_connection_is_dropped_after_the_acse_timeout(listener: RunningListener) -> None:
    with socket.create_connection(("127.0.0.1", listener.port), timeout=30) as raw:
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert raw.recv(64) == b""
        elapsed = time.monotonic() - started
    assert listener.settings.acse_timeout_seconds - 0.5 <= elapsed
    assert elapsed <= listener.settings.acse_timeout_seconds + 5


def test_forged_huge_rows_x_columns_is_refused_from_the_header(
    listener: RunningListener, tmp_path: Path
) -> None:
    forged = big_instance(tmp_path, 512, 512, declared=(65535, 65535))
    before = rss_bytes()
    started = time.monotonic()
    statuses = store_datasets(_destination(listener), [forged], _sender(listener))
    assert statuses == [0xC001]
    assert time.monotonic() - started < 5
    assert rss_bytes() - before < 32 * 2**20  # 65535² x 2 bytes would be 8 GiB
    refused = listener.instances("refused")
    assert "65535x65535x1 pixels exceed MAX_PIXELS" in refused[0].detail
    assert store_one(listener.port) == 0


def test_instance_above_the_size_cap_is_cut_off_while_receiving(
    make_listener: Callable[..., RunningListener], tmp_path: Path
) -> None:
    running = make_listener(max_instance_bytes=8 * 2**20)
    huge = big_instance(tmp_path, 4096, 4096, declared=None)  # 32 MiB of pixels
    before = rss_bytes()
    with pytest.raises(DestinationUnavailable, match="dropped the association"):
        store_datasets(_destination(running), [huge], _sender(running))
    assert rss_bytes() - before < 32 * 2**20
    poll(lambda: running.instances("refused"), "the refusal in the audit log", 10)
    assert "MAX_INSTANCE_BYTES" in running.instances("refused")[0].detail
    incoming = running.settings.spool_dir / ".incoming"
    poll(lambda: not list(incoming.iterdir()), "the partial file to be deleted", 10)
    assert store_one(running.port) == 0
    assert not list(running.settings.spool_dir.rglob("*.dcm"))[1:]  # only the good one


def test_large_instance_is_received_in_chunks_not_in_memory(
    make_listener: Callable[..., RunningListener], tmp_path: Path
) -> None:
    running = make_listener()
    large = big_instance(tmp_path, 8192, 8192, declared=None)  # 128 MiB of pixels
    before = rss_bytes()
    assert store_datasets(_destination(running), [large], _sender(running)) == [0]
    assert rss_bytes() - before < 48 * 2**20
    assert dataset_bytes(running.stored[0].path) == dataset_bytes(large)


def _destination(running: RunningListener) -> Destination:
    return Destination(kind="dimse", ae_title="BONEFLOW", host="127.0.0.1", port=running.port)


def _sender(running: RunningListener) -> object:
    return replace(running.settings, ae_title="HOSTILE", network_timeout_seconds=30)
