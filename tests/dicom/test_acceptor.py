"""The lean receive path: the C-STORE-RSP encoding, the hook, and the stock fallback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

import boneflow.dicom.acceptor as acceptor
from boneflow.dicom.acceptor import encode_c_store_rsp, lean_path_supported

from .conftest import (
    RunningListener,
    dataset_bytes,
    radiograph,
    store_radiographs,
)


def pynetdicom_encoding(context_id: int, rsp: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    message.context_id = context_id
    (primitive,) = list(message.encode_msg(context_id, 16384))
    return bytes(P_DATA_TF(primitive).encode())


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC000, 0xC001, 0xB000])
@pytest.mark.parametrize("message_id", [1, 255, 65535])
def test_c_store_rsp_bytes_equal_pynetdicoms_own(status: int, message_id: int) -> None:
    for sop_class, sop_instance in (
        ("1.2.840.10008.5.1.4.1.1.1", generate_uid()),  # odd and even lengths both occur
        ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4"),
        ("1.2.840.10008.5.1.4.1.1.1.1.1", "1.2.3"),
    ):
        rsp = C_STORE()
        rsp.MessageID = message_id
        rsp.MessageIDBeingRespondedTo = message_id
        rsp.AffectedSOPClassUID = sop_class
        rsp.AffectedSOPInstanceUID = sop_instance
        rsp.Status = status
        for context_id in (1, 3, 255):
            assert encode_c_store_rsp(context_id, rsp) == pynetdicom_encoding(context_id, rsp)


def test_c_store_rsp_with_fields_it_does_not_write_is_left_to_pynetdicom() -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    rsp.AffectedSOPInstanceUID = "1.2.3"
    rsp.Status = 0xC000
    rsp.ErrorComment = "cannot parse"
    assert encode_c_store_rsp(1, rsp) is None


def test_the_hook_is_only_for_the_pynetdicom_series_it_was_written_for() -> None:
    assert lean_path_supported("3.0.4")
    assert not lean_path_supported("2.1.1")
    assert not lean_path_supported("3.1.0")


def test_lean_and_stock_paths_spool_the_same_bytes_and_audit_once(
    make_listener: Callable[..., RunningListener],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    copy = tmp_path / "copy.dcm"  # not a duplicate of the RG3_UNCR that storescu sends
    ds = pydicom.dcmread(radiograph("RG3_UNCR.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(copy, enforce_file_format=True)
    installed: list[bool] = []
    real_install = acceptor.install_lean_receive

    def spy(assoc: object) -> bool:
        installed.append(real_install(assoc))
        return installed[-1]

    monkeypatch.setattr("boneflow.dicom.listener.install_lean_receive", spy)
    spooled: dict[bool, list[bytes]] = {}
    for lean in (True, False):
        if not lean:  # as if pynetdicom were another version: the stock path does it all
            monkeypatch.setattr(acceptor, "PYNETDICOM_SERIES", "9.9.")
        installed.clear()
        # many PDUs per image; a data dir each, or the second would see duplicates
        listener = make_listener(max_pdu_bytes=16384, data_dir=tmp_path / f"data-{lean}")
        files = store_radiographs(listener, copy)
        assert installed and set(installed) == {lean}
        assert len(listener.stored) == len(files) + 1
        assert len(listener.instances("stored")) == len(files) + 1
        # pynetdicom's SCU sends the file's dataset as it is in the file
        assert dataset_bytes(listener.stored[-1].path) == dataset_bytes(copy)
        assert not list(listener.settings.spool_dir.joinpath(".incoming").iterdir())
        spooled[lean] = [dataset_bytes(instance.path) for instance in listener.stored]
    assert spooled[True] == spooled[False]
