"""``boneflow send``/``echo`` and store_datasets against real peers (dcmtk, our listener)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from boneflow.config import Destination, Settings
from boneflow.dicom.send import echo_command, send_command, store_datasets
from boneflow.errors import DestinationUnavailable

from .conftest import RADIOGRAPHS, RunningListener, dataset_bytes, free_port, poll, radiograph

pytestmark = pytest.mark.integration


@dataclass
class Storescp:
    port: int
    folder: Path

    @property
    def destination(self) -> Destination:
        return Destination(kind="dimse", ae_title="STORESCP", host="127.0.0.1", port=self.port)

    def received(self) -> list[Path]:
        return sorted(self.folder.iterdir())


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Storescp]:
    """dcmtk's storescp accepting every SOP class and transfer syntax it knows."""
    folder = tmp_path / "storescp"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(
        ["storescp", "+B", "+xa", "-aet", "STORESCP", "-od", str(folder), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        poll(lambda: _echo_ok(port), "storescp", 10)
        yield Storescp(port, folder)
    finally:
        process.terminate()
        process.wait(10)


def boneflow(*argv: str) -> subprocess.CompletedProcess[str]:
    """The real command line, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "boneflow", *argv], capture_output=True, text=True, timeout=120
    )


def _echo_ok(port: int) -> bool:
    done = subprocess.run(["echoscu", "127.0.0.1", str(port)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(ae_title="SENDER", data_dir=tmp_path / "data", network_timeout_seconds=10)


def test_send_folder_recursively_to_storescp(
    storescp: Storescp, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "study"
    (folder / "series" / "deeper").mkdir(parents=True)
    for index, name in enumerate(RADIOGRAPHS):
        target = folder / "series" / ("deeper" if index % 2 else "") / name
        shutil.copyfile(radiograph(name), target)
    (folder / "README.txt").write_text("not DICOM")
    assert send_command(settings, [folder], storescp.destination) == 0
    out = capsys.readouterr().out
    assert "6 success" in out and "1 non-DICOM ignored" in out
    received = {pydicom.dcmread(p).SOPInstanceUID: p for p in storescp.received()}
    for name in RADIOGRAPHS:  # sent as on disk: nothing decoded or re-encoded
        source = radiograph(name)
        sop = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(received[sop]) == dataset_bytes(source)


def test_send_reports_refusals_and_exits_non_zero(
    listener: RunningListener,
    settings: Settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = pydicom.dcmread(radiograph("RG1_UNCR.dcm"))
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del bad.Rows
    bad.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    node = f"BONEFLOW@127.0.0.1:{listener.port}"
    argv = ["send", str(tmp_path / "bad.dcm"), str(radiograph("RG3_UNCR.dcm")), "--to", node,
            "--data-dir", str(settings.data_dir)]  # fmt: skip
    captured = boneflow(*argv)
    assert captured.returncode == 1
    assert "1 success" in captured.stdout
    assert "1 dataset does not match SOP class" in captured.stdout
    assert "bad.dcm: 0xA900" in captured.stderr
    assert len(listener.stored) == 1


def test_send_to_nobody_fails_cleanly(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    nobody = Destination(kind="dimse", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    assert send_command(settings, [radiograph("RG1_J2KI.dcm")], nobody) == 1
    assert "1 not sent" in capsys.readouterr().out
    assert echo_command(settings, nobody) == 1
    with pytest.raises(DestinationUnavailable):
        store_datasets(nobody, [radiograph("RG1_J2KI.dcm")], settings)


def test_send_of_a_non_dicom_file_named_on_the_command_line_fails(
    storescp: Storescp, settings: Settings, tmp_path: Path
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert send_command(settings, [text, tmp_path / "missing.dcm"], storescp.destination) == 1
    assert storescp.received() == []


def test_echo_storescp_and_listener(
    storescp: Storescp, listener: RunningListener, settings: Settings
) -> None:
    assert echo_command(settings, storescp.destination) == 0
    ours = Destination(kind="dimse", ae_title="BONEFLOW", host="127.0.0.1", port=listener.port)
    done = boneflow("echo", str(ours), "--data-dir", str(settings.data_dir))
    assert done.returncode == 0, done.stderr
    assert "success" in done.stdout


def _secondary_capture() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ConversionType, ds.PatientID = "OT", "WSD", "X"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(range(64))
    return ds


def test_store_datasets_mixes_files_and_datasets(storescp: Storescp, settings: Settings) -> None:
    capture = _secondary_capture()
    items: list[Path | Dataset] = [capture, radiograph("RG3_J2KI.dcm"), radiograph("RG1_UNCR.dcm")]
    assert store_datasets(storescp.destination, items, settings) == [0, 0, 0]
    received = {str(pydicom.dcmread(p).SOPInstanceUID) for p in storescp.received()}
    assert capture.SOPInstanceUID in received and len(received) == 3


def test_store_datasets_reports_sop_classes_the_peer_refuses(
    listener: RunningListener, settings: Settings
) -> None:
    ours = Destination(kind="dimse", ae_title="BONEFLOW", host="127.0.0.1", port=listener.port)
    statuses = store_datasets(ours, [_secondary_capture(), radiograph("RG1_UNCR.dcm")], settings)
    assert statuses == [0x0122, 0]  # our listener takes only CR/DX


def test_store_datasets_raises_when_the_association_is_rejected(
    make_listener: object, settings: Settings
) -> None:
    from boneflow.config import CallerRule

    running = make_listener(allowed_callers=(CallerRule("PACS"),))  # type: ignore[operator]
    ours = Destination(kind="dimse", ae_title="BONEFLOW", host="127.0.0.1", port=running.port)
    with pytest.raises(DestinationUnavailable, match="rejected the association"):
        store_datasets(ours, [radiograph("RG1_UNCR.dcm")], settings)


def test_store_datasets_calls_back_as_each_object_is_answered(
    storescp: Storescp, settings: Settings
) -> None:
    answered: list[tuple[int, int, int]] = []

    def on_status(index: int, status: int) -> None:
        answered.append((index, status, len(storescp.received())))

    items: list[Path | Dataset] = [_secondary_capture() for _ in range(3)]
    assert store_datasets(storescp.destination, items, settings, on_status=on_status) == [0] * 3
    assert [(index, status) for index, status, _ in answered] == [(0, 0), (1, 0), (2, 0)]


def test_a_requestor_socket_whose_shutdown_fails_is_closed_all_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pynetdicom's close() skipped close() when shutdown() raised (a peer that had reset
    the connection): a leaked descriptor and a ResourceWarning whenever the collector came
    by. Importing boneflow.dicom.send makes every requestor socket close regardless."""
    import errno
    import socket

    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.transport import AssociationSocket

    def shutdown_after_reset(self: socket.socket, how: int) -> None:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    ours, theirs = socket.socketpair()
    try:
        wrapped = AssociationSocket(Association(AE(), "requestor"), client_socket=ours)
        monkeypatch.setattr(socket.socket, "shutdown", shutdown_after_reset)
        wrapped.close()
        assert ours.fileno() == -1  # closed, not left to the garbage collector
        assert wrapped.socket is None
    finally:
        theirs.close()
        ours.close()
