"""The listener with real peers: dcmtk echoscu/storescu and pynetdicom clients."""

from __future__ import annotations

import os
import socket
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    Verification,
)

from boneflow.config import CallerRule, Destination, Settings
from boneflow.db.audit import Audit
from boneflow.db.migrate import upgrade
from boneflow.dicom.listener import TRANSFER_SYNTAXES, start_listener
from boneflow.dicom.send import store_datasets

from .conftest import (
    RADIOGRAPHS,
    STORESCU_PROPOSE,
    RunningListener,
    dataset_bytes,
    dcmtk,
    free_port,
    poll,
    radiograph,
)

pytestmark = pytest.mark.integration


def fresh(name: str = "RG1_UNCR.dcm") -> Dataset:
    """A real radiograph with new UIDs (so that it is not a duplicate)."""
    ds = pydicom.dcmread(radiograph(name))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def associate(port: int, calling: str = "TESTSCU", **contexts: object) -> object:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    for syntax in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"):
        ae.add_requested_context(ComputedRadiographyImageStorage, syntax)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", port, ae_title="BONEFLOW")


def test_every_accepted_transfer_syntax_has_a_decoder() -> None:
    for syntax in TRANSFER_SYNTAXES:
        decoder = get_decoder(syntax) if syntax not in _NATIVE else None
        assert decoder is None or decoder.is_available, f"no decoder for {syntax}"


_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"}


def test_echoscu_gets_success(listener: RunningListener) -> None:
    done = dcmtk("echoscu", "-aec", "BONEFLOW", "127.0.0.1", str(listener.port))
    assert done.returncode == 0, done.stderr
    assert [a.status for a in listener.associations()] == ["accepted"]


def test_storescu_real_radiographs_are_spooled_byte_identical(
    listener: RunningListener, tmp_path: Path
) -> None:
    files = [radiograph(name) for name in RADIOGRAPHS]
    # What storescu puts on the wire, written bit-preserving by dcmtk's own storescp.
    reference = tmp_path / "storescp"
    reference.mkdir()
    storescp_port = free_port()
    storescp = subprocess.Popen(
        ["storescp", "+B", "+xa", "-od", str(reference), "-aet", "REF", str(storescp_port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for port in (listener.port, storescp_port):
            for path in files:  # -R + the file's own syntax: nothing is transcoded
                syntax = str(pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID)
                poll(lambda p=port: _accepts(p), "a listening peer", 10)
                done = dcmtk("storescu", "-R", STORESCU_PROPOSE[syntax], "-aec", "BONEFLOW",
                             "127.0.0.1", str(port), str(path))  # fmt: skip
                assert done.returncode == 0, done.stderr
    finally:
        storescp.terminate()
        storescp.wait(10)
    assert len(listener.stored) == len(files)
    on_the_wire = {
        str(pydicom.filereader.read_file_meta_info(p).MediaStorageSOPInstanceUID): p
        for p in reference.iterdir()
    }
    for source, instance in zip(files, listener.stored, strict=True):
        assert_spooled_as_sent(listener, source, instance)
        assert dataset_bytes(instance.path) == dataset_bytes(on_the_wire[instance.sop_instance_uid])
    rows = listener.instances("stored")
    assert [r.sop_instance_uid for r in rows] == [i.sop_instance_uid for i in listener.stored]
    assert [i.instance_id for i in listener.stored] == [r.id for r in rows]
    assert not list(listener.settings.spool_dir.joinpath(".incoming").iterdir())


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_pynetdicom_file_send_is_spooled_byte_for_byte(listener: RunningListener) -> None:
    source = radiograph("RG3_J2KI.dcm")
    settings = replace(listener.settings, ae_title="SENDER")
    destination = Destination(kind="dimse", ae_title="BONEFLOW", host="127.0.0.1",
                              port=listener.port)  # fmt: skip
    assert store_datasets(destination, [source], settings) == [0]
    assert dataset_bytes(listener.stored[0].path) == dataset_bytes(source)


@pytest.mark.parametrize("syntax", list(STORESCU_PROPOSE))
def test_storescu_every_transfer_syntax(
    listener: RunningListener, syntax_files: dict[str, Path], syntax: str
) -> None:
    source = syntax_files[syntax]
    assert str(pydicom.filereader.read_file_meta_info(source).TransferSyntaxUID) == syntax
    done = dcmtk("storescu", "-R", STORESCU_PROPOSE[syntax], "-aec", "BONEFLOW",
                 "127.0.0.1", str(listener.port), str(source))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(listener.stored) == 1
    instance = listener.stored[0]
    assert instance.transfer_syntax == syntax
    assert_spooled_as_sent(listener, source, instance)
    assert [r.status for r in listener.instances()] == ["stored"]
    pixels = pydicom.dcmread(instance.path).pixel_array  # accepted means decodable
    assert pixels.shape == (1955, 1841)


def assert_spooled_as_sent(listener: RunningListener, source: Path, instance: object) -> None:
    """Spooled where it belongs, audited, and the same dataset as the source."""
    meta = pydicom.filereader.read_file_meta_info(source)
    assert instance.sop_instance_uid == meta.MediaStorageSOPInstanceUID
    assert instance.transfer_syntax == meta.TransferSyntaxUID
    assert instance.path.relative_to(listener.settings.spool_dir).parts == (
        instance.study_instance_uid,
        instance.series_instance_uid,
        f"{instance.sop_instance_uid}.dcm",
    )
    assert instance.size_bytes == instance.path.stat().st_size
    spooled, original = pydicom.dcmread(instance.path), pydicom.dcmread(source)
    original.pop(0xFFFCFFFC, None)  # dcmtk never sends Data Set Trailing Padding
    assert spooled == original
    assert spooled.PixelData == original.PixelData


def test_duplicate_is_acknowledged_and_not_handed_off_twice(listener: RunningListener) -> None:
    path = str(radiograph("RG3_UNCR.dcm"))
    for _ in range(2):
        done = dcmtk("storescu", "-aec", "BONEFLOW", "127.0.0.1", str(listener.port), path)
        assert done.returncode == 0, done.stderr
    assert len(listener.stored) == 1
    assert [r.status for r in listener.instances()] == ["stored", "duplicate"]


def test_disallowed_caller_is_rejected_with_the_standard_reason(
    make_listener: Callable[..., RunningListener],
) -> None:
    running = make_listener(
        allowed_callers=(CallerRule("PACS"), CallerRule("MODALITY", "10.9.9.9"))
    )
    refused = associate(running.port, calling="INTRUDER")
    assert refused.is_rejected
    primitive = refused.acceptor.primitive
    assert (primitive.result, primitive.result_source, primitive.diagnostic) == (1, 1, 3)
    wrong_host = associate(running.port, calling="MODALITY")
    assert wrong_host.is_rejected
    allowed = associate(running.port, calling="PACS")
    assert allowed.is_established
    allowed.release()
    assert [(a.status, "not allowed" in a.detail) for a in running.associations()] == [
        ("refused", True),
        ("refused", True),
        ("accepted", False),
    ]


def test_wrong_sop_class_is_refused_at_negotiation(listener: RunningListener) -> None:
    assoc = associate(listener.port)
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
        assert CTImageStorage in rejected
        assert ComputedRadiographyImageStorage in accepted
        ct = fresh()
        ct.SOPClassUID = CTImageStorage
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(ct)
    finally:
        assoc.release()


def test_dx_and_compressed_syntaxes_are_negotiated(listener: RunningListener) -> None:
    ae = AE(ae_title="TESTSCU")
    for syntax in TRANSFER_SYNTAXES:
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, syntax)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, "1.2.840.10008.1.2.4.100")
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="BONEFLOW")
    try:
        accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        assert accepted == set(TRANSFER_SYNTAXES)  # MPEG2 (.100) refused
    finally:
        assoc.release()


def _hostile(name: str) -> tuple[Dataset, int | None]:
    """A hostile dataset and the status it must get (None = stored)."""
    ds = fresh()
    if name == "truncated pixel data":
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
        return ds, 0xA900
    if name == "missing rows and columns":
        del ds.Rows
        del ds.Columns
        return ds, 0xA900
    if name == "absurd rows x columns":
        ds.Rows = ds.Columns = 65535
        return ds, 0xC001
    if name == "non-UID SOP Instance UID":
        ds.SOPInstanceUID = "../x"
        ds.file_meta.MediaStorageSOPInstanceUID = "../x"
        return ds, 0xA900
    if name == "non-UID Study Instance UID":
        ds.StudyInstanceUID = "1.2/../../etc"
        return ds, 0xA900
    if name == "UTF-8 patient name":
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "山田^太郎=やまだ^たろう"
        return ds, None
    if name == "unknown character set":
        ds.SpecificCharacterSet = "ISO_IR 999"
        ds["PatientName"] = pydicom.DataElement(0x00100010, "PN", b"M\xfcller^J\xf6rg\xff")
        return ds, None
    raise AssertionError(name)


HOSTILE = (
    "truncated pixel data",
    "missing rows and columns",
    "absurd rows x columns",
    "non-UID SOP Instance UID",
    "non-UID Study Instance UID",
    "UTF-8 patient name",
    "unknown character set",
)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_dataset_gets_a_status_and_the_listener_goes_on(
    listener: RunningListener, name: str
) -> None:
    # pydicom warns about the invalid UIDs on both sides; outside pytest a warning is
    # only logged, so it must not turn into an exception here either.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        hostile, expected = _hostile(name)
        assoc = associate(listener.port)
        status = assoc.send_c_store(hostile)
    try:
        assert status.Status == (0x0000 if expected is None else expected)
        follow_up = fresh()
        assert assoc.send_c_store(follow_up).Status == 0x0000  # same association
    finally:
        assoc.release()
    again = associate(listener.port)  # and a new one
    try:
        assert again.send_c_store(fresh()).Status == 0x0000
    finally:
        again.release()
    rows = listener.instances()
    if expected is None:
        assert [r.status for r in rows] == ["stored"] * 3
        stored = listener.stored[0]
        name_bytes = "山田".encode() if "UTF-8" in name else b"M\xfcller^J\xf6rg\xff"
        assert name_bytes in stored.path.read_bytes()  # the name as sent, not re-encoded
        assert dataset_bytes(stored.path) == _encoded(hostile)
    else:
        assert [r.status for r in rows] == ["refused", "stored", "stored"]
        assert f"0x{expected:04X}" in rows[0].detail
        assert len(listener.stored) == 2
    spooled = sorted(p.name for p in listener.settings.spool_dir.rglob("*.dcm"))
    assert len(spooled) == len(listener.stored)
    assert all(".." not in p for p in spooled)


def _encoded(ds: Dataset) -> bytes:
    """The dataset as pynetdicom puts it on the wire (explicit VR little endian)."""
    from pynetdicom.dsutils import encode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the unknown character set
        encoded = encode(ds, False, True)
    assert encoded is not None
    return encoded


def test_on_stored_that_raises_is_audited_and_the_peer_gets_success(
    ingest_settings: Settings,
) -> None:
    settings = ingest_settings
    upgrade(settings.resolved_database_url)
    audit = Audit.open(settings.resolved_database_url)

    def broken(instance: object) -> None:
        raise RuntimeError("queue is down")

    handle = start_listener(settings, audit, broken)
    try:
        done = dcmtk("storescu", "-R", "-xv", "-aec", "BONEFLOW", "127.0.0.1", str(handle.port),
                     str(radiograph("RG1_J2KR.dcm")))  # fmt: skip
        assert done.returncode == 0, done.stderr
        statuses = [e.status for e in audit.trail() if e.event == "instance"]
        assert statuses == ["stored", "failed"]
        assert "hand-off failed" in audit.trail()[-1].detail
    finally:
        handle.stop()
        audit.close()


def test_max_associations_rejects_the_extra_one(
    make_listener: Callable[..., RunningListener],
) -> None:
    running = make_listener(max_associations=1)
    first = associate(running.port)
    assert first.is_established
    try:
        second = associate(running.port)
        assert second.is_rejected
    finally:
        first.release()
    poll(lambda: associate_and_release(running.port), "a free association slot", 10)
    statuses = [(a.status, "MAX_ASSOCIATIONS" in a.detail) for a in running.associations()]
    assert statuses[:2] == [("accepted", False), ("refused", True)]


def associate_and_release(port: int) -> bool:
    assoc = associate(port)
    if not assoc.is_established:
        return False
    assoc.release()
    return True


def test_no_free_disk_answers_out_of_resources(
    make_listener: Callable[..., RunningListener],
) -> None:
    running = make_listener(min_free_bytes=2**62)
    assoc = associate(running.port)
    try:
        assert assoc.send_c_store(fresh()).Status == 0xA700
    finally:
        assoc.release()
    assert [r.status for r in running.instances()] == ["refused"]
    assert not running.stored
