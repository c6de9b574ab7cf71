"""The blocking data phase: one thread per association reads, serves and hands back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    Verification,
)

import boneflow.dicom.acceptor as acceptor

from .conftest import (
    RADIOGRAPHS,
    RunningListener,
    dataset_bytes,
    dcmtk,
    poll,
    radiograph,
    store_radiographs,
)

pytestmark = pytest.mark.integration

CR = ComputedRadiographyImageStorage
A_ABORT_PDU = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"


@pytest.fixture
def phases(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each blocking data phase of the listener: "serving", then "handed back"."""
    seen: list[str] = []
    real_serve = acceptor._LeanReader._serve_blocking

    def serve(reader: Any) -> None:
        seen.append("serving")
        try:
            real_serve(reader)
        finally:
            seen.append("handed back")  # to pynetdicom's reactors, which finish it

    monkeypatch.setattr(acceptor._LeanReader, "_serve_blocking", serve)
    return seen


def fresh(name: str = "RG3_UNCR.dcm") -> Dataset:
    ds = pydicom.dcmread(radiograph(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def associate(port: int, timeout: float = 30) -> Any:
    ae = AE(ae_title="PEER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    ae.add_requested_context(CR, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="BONEFLOW")
    assert assoc.is_established
    return assoc


def drop(assoc: Any) -> None:
    """Abort at the peer's end and close its socket (pynetdicom leaves a reset one open)."""
    raw = assoc.dul.socket.socket
    assoc.abort()
    if raw is not None:
        raw.close()


def acceptors() -> list[Any]:
    """The listener's association threads in this process (the peers' are requestors)."""
    return [t for t in threading.enumerate() if isinstance(t, Association) and t.is_acceptor]


def test_blocking_and_polling_data_phases_spool_the_same_bytes_and_audit_once(
    make_listener: Callable[..., RunningListener],
    monkeypatch: pytest.MonkeyPatch,
    phases: list[str],
    tmp_path: Path,
) -> None:
    copy = tmp_path / "copy.dcm"
    fresh().save_as(copy, enforce_file_format=True)
    files = [radiograph(name) for name in RADIOGRAPHS]
    spooled: dict[bool, list[bytes]] = {}
    for blocking in (True, False):
        monkeypatch.setattr(acceptor, "BLOCKING_DATA_PHASE", blocking)
        phases.clear()
        # many PDUs per image; a data dir each, or the second would see duplicates
        listener = make_listener(max_pdu_bytes=16384, data_dir=tmp_path / f"data-{blocking}")
        store_radiographs(listener, copy)  # dcmtk per file, then pynetdicom's SCU
        expected = ["serving", "handed back"] * (len(files) + 1) if blocking else []
        poll(lambda e=expected: phases == e, f"data phases {expected}, not {phases}", 10)
        rows = listener.instances("stored")
        assert sorted(r.sop_instance_uid for r in rows) == sorted(
            i.sop_instance_uid for i in listener.stored
        )
        assert len(rows) == len(listener.instances()) == len(files) + 1  # audited once each
        # pynetdicom's SCU sends the file's dataset as it is (dcmtk's may differ from its
        # file, see test_listener: it is compared with what dcmtk's storescp received)
        assert dataset_bytes(listener.stored[-1].path) == dataset_bytes(copy)
        assert not list(listener.settings.spool_dir.joinpath(".incoming").iterdir())
        spooled[blocking] = [instance.path.read_bytes() for instance in listener.stored]
    assert spooled[True] == spooled[False]  # preamble, file meta and dataset alike


def test_an_idle_association_parks_both_threads(
    listener: RunningListener, phases: list[str]
) -> None:
    assoc = associate(listener.port)
    try:
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(fresh()).Status == 0x0000
        poll(lambda: len(acceptors()) == 1, "one association at the listener", 5)
        (server,) = acceptors()
        reader = server.dul._is_transport_event.__self__
        poll(lambda: reader._dul_state == "parked", "the DUL thread to park", 5)
        before = _cpu_ticks(server) + _cpu_ticks(server.dul)
        time.sleep(2.0)  # pynetdicom's reactors would poll 2 x 2000 times meanwhile
        used = _cpu_ticks(server) + _cpu_ticks(server.dul) - before
        assert used <= 2, f"{used} clock ticks of CPU in 2 s of idling"
        assert assoc.send_c_store(fresh()).Status == 0x0000  # still served at once
    finally:
        assoc.release()
    assert assoc.is_released
    poll(lambda: not acceptors(), "the listener's association thread to end", 10)
    assert phases == ["serving", "handed back"]  # released through pynetdicom's reactors
    assert len(listener.instances("stored")) == 2


@pytest.mark.parametrize("late", [False, True])
def test_a_peer_that_releases_at_once_is_not_kept_waiting(
    listener: RunningListener, monkeypatch: pytest.MonkeyPatch, late: bool
) -> None:
    if late:  # the A-RELEASE-RQ is in before the association thread asks the DUL to park
        real_park = acceptor._LeanReader._park_dul

        def park_late(reader: Any) -> bool:
            time.sleep(0.3)
            return bool(real_park(reader))

        monkeypatch.setattr(acceptor._LeanReader, "_park_dul", park_late)
    for _ in range(5):
        started = time.monotonic()
        assoc = associate(listener.port)
        assoc.release()
        assert assoc.is_released
        poll(lambda: not acceptors(), "the listener's association thread to end", 5)
        assert time.monotonic() - started < 2


def test_peer_abort_between_and_inside_datasets(
    listener: RunningListener, phases: list[str]
) -> None:
    between = associate(listener.port)
    assert between.send_c_store(fresh()).Status == 0x0000
    between.abort()
    poll(lambda: not acceptors(), "the association to end after the abort", 10)
    inside = associate(listener.port)
    raw = inside.dul.socket.socket
    pdus = _c_store_pdus(inside, fresh(), max_pdu=16384)
    raw.sendall(b"".join(pdus[: len(pdus) // 2]))  # command and half of the dataset...
    incoming = listener.settings.spool_dir / ".incoming"
    poll(lambda: list(incoming.iterdir()), "the partial dataset on disk", 10)
    raw.sendall(A_ABORT_PDU)  # ...then an A-ABORT
    poll(lambda: not acceptors(), "the association to end after the abort", 10)
    drop(inside)
    poll(lambda: not list(incoming.iterdir()), "the partial file to be deleted", 10)
    assert phases == ["serving", "handed back"] * 2
    assert len(listener.instances("stored")) == len(listener.instances()) == 1
    assert _store_one(listener.port) == 0


def test_a_stalled_pdu_is_cut_off_and_others_are_served(listener: RunningListener) -> None:
    stalled = associate(listener.port)
    pdus = _c_store_pdus(stalled, fresh(), max_pdu=16384)
    stalled.dul.socket.socket.sendall(b"".join(pdus[:3]) + pdus[3][:100])  # mid-PDU
    started = time.monotonic()
    assert _store_one(listener.port) == 0  # served meanwhile
    poll(lambda: len(acceptors()) == 0, "the stalled association to be cut off", 30)
    elapsed = time.monotonic() - started
    drop(stalled)
    assert elapsed <= listener.settings.network_timeout_seconds + 5
    assert len(listener.instances("stored")) == len(listener.instances()) == 1


def test_idle_association_is_aborted_after_the_network_timeout(
    listener: RunningListener,
) -> None:
    timeout = listener.settings.network_timeout_seconds
    assoc = associate(listener.port, timeout=60)  # the peer itself would wait longer
    assert assoc.send_c_store(fresh()).Status == 0x0000
    started = time.monotonic()
    poll(lambda: assoc.is_aborted, "the listener's A-ABORT", timeout + 10)
    assert timeout - 0.5 <= time.monotonic() - started <= timeout + 5


def test_stopping_the_listener_aborts_an_idle_association(
    make_listener: Callable[..., RunningListener],
) -> None:
    running = make_listener(network_timeout_seconds=60)
    assoc = associate(running.port, timeout=60)
    assert assoc.send_c_echo().Status == 0x0000
    started = time.monotonic()
    running.handle.stop()  # waits 5 s for associations to finish, then aborts them
    assert time.monotonic() - started < 8
    poll(lambda: assoc.is_aborted, "the A-ABORT at the peer", 5)
    poll(lambda: not acceptors(), "the listener's association thread to end", 5)


def test_a_message_it_does_not_serve_hands_back_and_the_association_goes_on(
    listener: RunningListener, phases: list[str]
) -> None:
    assoc = associate(listener.port)
    try:
        assert assoc.send_c_store(fresh()).Status == 0x0000
        unexpected = C_STORE()  # a C-STORE *response* from the peer: not a request
        unexpected.MessageIDBeingRespondedTo = 7
        unexpected.AffectedSOPClassUID = CR
        unexpected.AffectedSOPInstanceUID = generate_uid()
        unexpected.Status = 0x0000
        assoc.dimse.send_msg(unexpected, _context_id(assoc))
        poll(lambda: phases == ["serving", "handed back"], "the hand-back", 10)
        status = assoc.send_c_store(fresh())  # now served by pynetdicom's reactors
        assert status.Status == 0x0000
    finally:
        assoc.release()
    assert assoc.is_released
    assert len(listener.instances("stored")) == 2


def test_a_message_on_a_context_that_was_not_accepted_aborts_promptly(
    listener: RunningListener, phases: list[str]
) -> None:
    # pynetdicom aborts from the association's own thread and waits for the DUL thread
    assoc = associate(listener.port)
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = Verification
    started = time.monotonic()
    assoc.dimse.send_msg(echo, 99)  # no presentation context 99 was accepted
    poll(lambda: assoc.is_aborted, "the listener's A-ABORT", 10)
    poll(lambda: not acceptors(), "the listener's association thread to end", 10)
    assert time.monotonic() - started < 5
    drop(assoc)
    assert phases == ["serving", "handed back"]
    assert _store_one(listener.port) == 0


def test_a_store_of_an_unknown_sop_class_aborts_promptly(
    listener: RunningListener, phases: list[str]
) -> None:
    assoc = associate(listener.port)
    pdus = _c_store_pdus(assoc, fresh(), max_pdu=16384, sop_class="1.2.3.4")
    started = time.monotonic()
    assoc.dul.socket.socket.sendall(b"".join(pdus))  # no service class for 1.2.3.4
    poll(lambda: assoc.is_aborted, "the listener's A-ABORT", 10)
    poll(lambda: not acceptors(), "the listener's association thread to end", 10)
    assert time.monotonic() - started < 5
    drop(assoc)
    assert phases == ["serving", "handed back"]
    assert not listener.instances()
    assert not list(listener.settings.spool_dir.joinpath(".incoming").iterdir())


@pytest.mark.parametrize("sop_class", [CTImageStorage, DigitalXRayImageStorageForPresentation])
def test_a_store_on_another_sop_class_context_is_refused_and_the_association_goes_on(
    listener: RunningListener, sop_class: str
) -> None:
    # pynetdicom serves a C-STORE by the SOP class in its command, whatever the context
    assoc = associate(listener.port)  # CR and Verification only
    try:
        other = fresh()
        other.SOPClassUID = sop_class
        assoc._reactor_checkpoint.clear()  # as pynetdicom's own requests do: the response
        try:  # is for this test to read, not for the association's reactor to discard
            assoc.dul.socket.socket.sendall(
                b"".join(_c_store_pdus(assoc, other, max_pdu=16384, sop_class=sop_class))
            )
            _context, response = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert response is not None and response.Status == 0x0122  # SOP class not supported
        assert assoc.send_c_store(fresh()).Status == 0x0000  # the association goes on
    finally:
        assoc.release()
    refused = listener.instances("refused")
    assert [r.sop_instance_uid for r in refused] == [other.SOPInstanceUID]
    assert "0x0122" in refused[0].detail and f"negotiated for {CR}" in refused[0].detail
    assert len(listener.stored) == 1 and len(listener.instances("stored")) == 1
    assert not list(listener.settings.spool_dir.joinpath(".incoming").iterdir())


def test_oversized_pdu_in_the_data_phase_is_cut_off_and_audited(
    make_listener: Callable[..., RunningListener], phases: list[str]
) -> None:
    running = make_listener(max_pdu_bytes=16384)
    assoc = associate(running.port)
    assert assoc.send_c_store(fresh()).Status == 0x0000  # the data phase is running
    assoc.dul.socket.socket.sendall(b"\x04\x00\x00\x01\x00\x00" + b"\x00" * 64)  # 64 KiB
    poll(lambda: not acceptors(), "the association to be cut off", 10)
    drop(assoc)
    refused = running.instances("refused")
    assert (
        len(refused) == 1 and "PDU of 65536 bytes exceeds the limit of 16384" in refused[0].detail
    )
    assert phases == ["serving", "handed back"]
    assert _store_one(running.port) == 0


def _c_store_pdus(assoc: Any, ds: Dataset, max_pdu: int, sop_class: str = CR) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE request, encoded as pynetdicom would send them."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(encode(ds, False, True))  # explicit VR little endian
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return [bytes(P_DATA_TF(p).encode()) for p in message.encode_msg(_context_id(assoc), max_pdu)]


def _context_id(assoc: Any) -> int:
    (context,) = [c for c in assoc.accepted_contexts if c.abstract_syntax == CR]
    return int(context.context_id)


def _store_one(port: int) -> int:
    """storescu with RG1 (each test stores it once; its other images are RG3 copies)."""
    path = str(radiograph("RG1_UNCR.dcm"))
    return dcmtk(
        "storescu", "-R", "-xe", "-aec", "BONEFLOW", "127.0.0.1", str(port), path
    ).returncode


def _cpu_ticks(thread: threading.Thread) -> int:
    """User + system clock ticks a thread of this process has used so far."""
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime
