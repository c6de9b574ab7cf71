"""The round trip through a real PACS: Orthanc forwards RG3 to `boneflow serve`, and the SR
and one Secondary Capture per image come back into the same study in Orthanc.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pydicom.config
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from boneflow.db.audit import Audit, DispatchStatus, InstanceStatus
from boneflow.db.schema import Association, DispatchAttempt, Instance, OutboxItem, Result
from boneflow.orthanc import Orthanc, OrthancInstance
from tests.conftest import wait_for
from tests.integration.conftest import StartRoundTrip

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RG3 = ("RG3_UNCR.dcm", "RG3_J2KR.dcm")  # one study, two images (uncompressed, JPEG 2000)
RESULTS_SECONDS = 300.0
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


def _sources() -> list[tuple[Path, Dataset]]:
    found = []
    for name in RG3:
        path = get_testdata_file(name, download=False)
        assert path is not None, f"pydicom-data lacks {name}"
        found.append((Path(str(path)), pydicom.dcmread(path)))
    return found


def _results_in(
    orthanc: Orthanc, study: str
) -> tuple[list[OrthancInstance], list[OrthancInstance]]:
    """boneflow's SRs and SCs that Orthanc holds in ``study``."""
    instances = orthanc.study_instances(study) if orthanc.running else []
    srs = [i for i in instances if i.sop_class_uid.startswith(SR_PREFIX)]
    scs = [i for i in instances if i.sop_class_uid.startswith(SC_PREFIX)]
    return srs, scs


def _complete(orthanc: Orthanc, study: str, images: int) -> bool:
    srs, scs = _results_in(orthanc, study)
    return len(srs) >= 1 and len(scs) >= images


@contextmanager
def _strict() -> Iterator[None]:
    settings = pydicom.config.settings
    previous = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.RAISE
    try:
        yield
    finally:
        settings.reading_validation_mode = previous


def _read(orthanc: Orthanc, instance: OrthancInstance) -> Dataset:
    with _strict():
        return pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance.orthanc_id)))


def _walk(ds: Dataset) -> Iterator[Dataset]:
    yield ds
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk(item)


def _referenced_uids(ds: Dataset) -> set[str]:
    return {
        str(item.ReferencedSOPInstanceUID)
        for item in _walk(ds)
        if "ReferencedSOPInstanceUID" in item
    }


def _numeric_values(sr: Dataset) -> list[float]:
    return [
        float(measured.NumericValue)
        for item in _walk(sr)
        if item.get("ValueType") == "NUM"
        for measured in item.get("MeasuredValueSequence", [])
    ]


def _upload(orthanc: Orthanc, sources: list[tuple[Path, Dataset]]) -> None:
    for path, _ in sources:
        orthanc.upload(path.read_bytes())


def test_rg3_round_trip_puts_the_sr_and_one_sc_per_image_into_the_study(
    start_round_trip: StartRoundTrip,
) -> None:
    trip = start_round_trip()
    sources = _sources()
    study = str(sources[0][1].StudyInstanceUID)
    _upload(trip.orthanc, sources)
    wait_for(
        lambda: _complete(trip.orthanc, study, len(sources)),
        "the SR and one SC per image in Orthanc's study",
        RESULTS_SECONDS,
    )
    srs, scs = _results_in(trip.orthanc, study)
    assert len(srs) == 1 and len(scs) == len(sources)
    source_uids = {str(ds.SOPInstanceUID) for _, ds in sources}
    patient_id = str(sources[0][1].PatientID)

    sc_sources: dict[str, str] = {}
    for instance in scs:
        sc = _read(trip.orthanc, instance)
        assert (sc.PatientID, sc.StudyInstanceUID) == (patient_id, study)
        assert sc.SeriesInstanceUID not in {str(ds.SeriesInstanceUID) for _, ds in sources}
        assert "boneflow" in str(sc.get("SeriesDescription", "")).lower()
        (source,) = _referenced_uids(sc) & source_uids
        sc_sources[str(sc.SOPInstanceUID)] = source
        pixels = sc.pixel_array
        assert pixels.size > 0 and pixels.max() > pixels.min()
    assert sorted(sc_sources.values()) == sorted(source_uids)  # one SC per image

    sr = _read(trip.orthanc, srs[0])
    assert (sr.PatientID, sr.StudyInstanceUID, sr.Modality) == (patient_id, study, "SR")
    assert "boneflow" in str(sr.get("SeriesDescription", "")).lower()
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    referenced = _referenced_uids(sr)
    assert source_uids <= referenced, "the SR covers every image"
    assert set(sc_sources) <= referenced, "the SR references each image's SC"
    text = str(sr)
    assert "test-router" in text and "test-fracture-leg" in text  # models named

    audit = Audit.open(trip.settings.resolved_database_url)
    try:
        with audit.session() as session:
            results = list(
                session.scalars(select(Result).where(Result.study_instance_uid == study))
            )
            callers = set(session.scalars(select(Association.calling_ae_title)))
            attempts = list(session.scalars(select(DispatchAttempt.status)))
        assert audit.verify() == []
    finally:
        audit.close()
    assert {r.sop_instance_uid for r in results} == source_uids
    assert {r.body_part for r in results} == {"lower_leg"}
    numbers = _numeric_values(sr)
    for result in results:
        assert result.fracture_probability is not None
        assert any(abs(value - result.fracture_probability) < 1e-3 for value in numbers), (
            f"P(fracture)={result.fracture_probability} of {result.sop_instance_uid} is "
            f"not in the SR's numbers {numbers}"
        )
    assert callers == {"ORTHANC"}
    assert attempts.count(DispatchStatus.SENT) == 1 + len(sources)


def test_results_wait_while_orthanc_is_down_and_arrive_when_it_is_back(
    start_round_trip: StartRoundTrip,
) -> None:
    trip = start_round_trip(settle_seconds=4.0)  # time to stop Orthanc before results exist
    sources = _sources()
    study = str(sources[0][1].StudyInstanceUID)
    audit = Audit.open(trip.settings.resolved_database_url)
    try:
        _upload(trip.orthanc, sources)
        wait_for(
            lambda: _count(audit, Instance, Instance.status == InstanceStatus.STORED) == 2,
            "the node to store both forwarded images",
            60,
        )
        trip.orthanc.stop()
        wait_for(
            lambda: _count(audit, DispatchAttempt, DispatchAttempt.status == "failed") >= 1,
            "a failed send to the stopped Orthanc",
            RESULTS_SECONDS,
        )
        assert _count(audit, DispatchAttempt, DispatchAttempt.status == "sent") == 0
        trip.orthanc.start()
        wait_for(
            lambda: _complete(trip.orthanc, study, len(sources)),
            "the SR and the SCs after Orthanc came back",
            RESULTS_SECONDS,
        )
        wait_for(
            lambda: (
                _count(audit, DispatchAttempt, DispatchAttempt.status == "sent")
                == _count(audit, OutboxItem)
            ),
            "every outbox item to be sent",
            60,
        )
        with audit.session() as session:
            sent_per_item = session.execute(
                select(DispatchAttempt.outbox_item_id, func.count())
                .where(DispatchAttempt.status == "sent")
                .group_by(DispatchAttempt.outbox_item_id)
            ).all()
    finally:
        audit.close()
    assert len(sent_per_item) == 1 + len(sources)
    assert all(count == 1 for _, count in sent_per_item), "each object is sent exactly once"
    srs, scs = _results_in(trip.orthanc, study)
    assert len(srs) == 1 and len(scs) == len(sources)


def _count(audit: Audit, table: type, *where: object) -> int:
    with audit.session() as session:
        return int(session.scalar(select(func.count()).select_from(table).where(*where)) or 0)
