"""The built-in receiving node: real peers (dcmtk storescu, pynetdicom) send to it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pydicom.dataset
import pydicom.uid
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from boneflow.dicom.receiver import start_receiver

RG3 = ("RG3_UNCR.dcm", "RG3_J2KR.dcm")


def _path(name: str) -> Path:
    found = get_testdata_file(name)
    assert found is not None, f"pydicom-data lacks {name}"
    return Path(str(found))


def test_storescu_instances_are_written_and_read_back(tmp_path: Path) -> None:
    with start_receiver(tmp_path / "in", ae_title="DEST") as receiver:
        for name, proposed in zip(RG3, ("-xe", "-xv"), strict=True):
            done = subprocess.run(
                [
                    *("storescu", proposed, "-aet", "SENDER", "-aec", "DEST", "127.0.0.1"),
                    *(str(receiver.port), str(_path(name))),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
        received = receiver.wait_for(2, timeout_seconds=20)
    assert len(received) == 2
    for item, name in zip(received, RG3, strict=True):
        source = pydicom.dcmread(_path(name))
        assert item.sop_instance_uid == source.SOPInstanceUID
        assert item.study_instance_uid == source.StudyInstanceUID
        assert item.modality == "CR"
        assert item.calling_ae_title == "SENDER"
        assert item.path.is_file()
        assert item.path.relative_to(tmp_path / "in").parts[:2] == (
            source.StudyInstanceUID,
            source.SeriesInstanceUID,
        )
        back = pydicom.dcmread(item.path)
        assert back.SOPInstanceUID == source.SOPInstanceUID
        assert back.PatientID == source.PatientID
        assert back.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    assert not list((tmp_path / "in").rglob("*.partial"))


def test_unknown_caller_and_wrong_called_title_are_rejected(tmp_path: Path) -> None:
    with start_receiver(tmp_path, ae_title="DEST", allowed_callers=["BONEFLOW"]) as receiver:
        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(Verification)
        assoc = stranger.associate("127.0.0.1", receiver.port, ae_title="DEST")
        assert assoc.is_rejected
        friend = AE(ae_title="BONEFLOW")
        friend.add_requested_context(Verification)
        assoc = friend.associate("127.0.0.1", receiver.port, ae_title="NOT-DEST")
        assert assoc.is_rejected
        assoc = friend.associate("127.0.0.1", receiver.port, ae_title="DEST")
        assert assoc.is_established
        status = assoc.send_c_echo()
        assoc.release()
        assert status.Status == 0x0000
    assert receiver.received() == []


def test_an_unreadable_dataset_gets_a_failure_status_and_the_node_keeps_serving(
    tmp_path: Path,
) -> None:
    with start_receiver(tmp_path, ae_title="DEST") as receiver:
        sender = AE(ae_title="SENDER")
        sender.add_requested_context(ComputedRadiographyImageStorage)
        assoc = sender.associate("127.0.0.1", receiver.port, ae_title="DEST")
        assert assoc.is_established
        broken = pydicom.Dataset()  # no UIDs: the receiver cannot file it
        broken.SOPClassUID = ComputedRadiographyImageStorage
        broken.SOPInstanceUID = "1.2.3.4"
        broken.file_meta = pydicom.dataset.FileMetaDataset()
        broken.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        status = assoc.send_c_store(broken)
        assert status.Status == 0xC210
        good = pydicom.dcmread(_path("RG3_UNCR.dcm"))
        status = assoc.send_c_store(good)
        assoc.release()
        assert status.Status == 0x0000
    assert [item.sop_instance_uid for item in receiver.received()] == [good.SOPInstanceUID]


@pytest.mark.parametrize("count", [0])
def test_wait_for_returns_what_arrived_when_the_time_is_up(tmp_path: Path, count: int) -> None:
    with start_receiver(tmp_path) as receiver:
        assert receiver.wait_for(count + 1, timeout_seconds=0.3) == []
        assert receiver.node == f"RECEIVER@127.0.0.1:{receiver.port}"
