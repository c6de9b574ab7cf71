"""The TID 1500 SR: valid, strict, and read back by highdicom with the values written."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from boneflow import __version__
from boneflow.dicom.pixels import read_pixels
from boneflow.dicom.results import build_result_objects, to_bytes
from boneflow.dicom.sc import build_secondary_capture
from boneflow.dicom.sr import (
    BODY_PART_CODES,
    FRACTURE,
    NOT_DONE,
    OPERATING_THRESHOLD,
    PROBABILITY,
    build_structured_report,
    device_uid,
)
from boneflow.findings import BoundingBox, Finding
from tests.dicom.results_data import (
    ROUTER,
    WRIST_MODEL,
    analysed_finding,
    dciodvfy,
    not_analysed_finding,
    radiograph,
    strict_read,
)


@pytest.fixture(scope="module")
def study() -> tuple[list[Dataset], list[Finding], dict[str, Dataset]]:
    """RG3 analysed (positive, right wrist) and RG1 not analysed (a chest), one study."""
    wrist, chest = radiograph("RG3_UNCR.dcm"), radiograph("RG1_UNCR.dcm")
    chest.StudyInstanceUID = wrist.StudyInstanceUID  # one study of two images
    chest.PatientID, chest.PatientName = wrist.PatientID, wrist.PatientName
    findings = [analysed_finding(wrist), not_analysed_finding(chest)]
    sc = build_secondary_capture(
        wrist,
        findings[0],
        read_pixels(wrist),
        series_instance_uid=generate_uid(),
        series_number=9902,
        instance_number=1,
        series_description="boneflow test Grad-CAM",
    )
    return [wrist, chest], findings, {str(wrist.SOPInstanceUID): sc}


def build(
    study: tuple[list[Dataset], list[Finding], dict[str, Dataset]],
    predecessor: Dataset | None = None,
) -> Dataset:
    sources, findings, captures = study
    return build_structured_report(
        sources,
        findings,
        captures,
        series_instance_uid=generate_uid(),
        series_number=9901,
        series_description=f"boneflow {__version__} SR {ROUTER} {WRIST_MODEL}",
        predecessor=predecessor,
        ae_title="BONEFLOW",
    )


def test_sr_passes_dciodvfy_and_strict_reading(
    study: tuple[list[Dataset], list[Finding], dict[str, Dataset]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = to_bytes(build(study))
    errors, warnings = dciodvfy(data, tmp_path)
    assert errors == []
    # The only warnings: our declared private coding scheme (listed in docs/conformance.md).
    assert all("99BONEFLOW" in line for line in warnings)
    sr = strict_read(data, monkeypatch)
    wrist = study[0][0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert (sr.StudyInstanceUID, sr.PatientID) == (wrist.StudyInstanceUID, wrist.PatientID)
    assert sr.PatientName == wrist.PatientName
    assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in study[0]}
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert "boneflow" in sr.SeriesDescription and str(WRIST_MODEL) in sr.SeriesDescription
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99BONEFLOW"


def test_highdicom_reads_back_the_written_values(
    study: tuple[list[Dataset], list[Finding], dict[str, Dataset]],
) -> None:
    sources, findings, captures = study
    wrist, chest = sources
    report = hd.sr.srread(io.BytesIO(to_bytes(build(study))))
    content = report.content

    root = content[0]
    assert _concept(root) == "126000"  # Imaging Measurement Report
    library = [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for group in _children(root, "111028")  # Image Library
        for library_group in group.ContentSequence
        for item in library_group.ContentSequence
        if item.ValueType == "IMAGE"
    ]
    assert sorted(library) == sorted([wrist.SOPInstanceUID, chest.SOPInstanceUID])
    observer = _flatten(root)
    assert ("121012", device_uid("BONEFLOW")) in observer  # Device Observer UID
    assert ("121013", "BONEFLOW") in observer  # Device Observer Name

    (roi,) = content.get_planar_roi_measurement_groups()
    finding = findings[0]
    assert roi.tracking_identifier and roi.tracking_uid
    assert roi.finding_type.value == FRACTURE.value
    site = roi.finding_sites[0]
    assert site.value == BODY_PART_CODES["wrist"]
    assert site.laterality == codes.SCT.Right
    (evaluation,) = roi.get_qualitative_evaluations(name=FRACTURE)
    assert evaluation.value.value == codes.SCT.Present.value
    (probability,) = roi.get_measurements(name=PROBABILITY)
    assert probability.value == pytest.approx(finding.fracture_probability)
    (threshold,) = roi.get_measurements(name=OPERATING_THRESHOLD)
    assert threshold.value == pytest.approx(finding.threshold)
    algorithm = _flatten(roi[0])
    assert ("111001", WRIST_MODEL.name) in algorithm  # Algorithm Name
    assert ("111003", WRIST_MODEL.version) in algorithm  # Algorithm Version
    assert any(value == f"router {ROUTER}" for _, value in algorithm)
    box = finding.hotspot
    assert box is not None
    np.testing.assert_allclose(
        roi.roi.value,
        [
            [box.col_min, box.row_min],
            [box.col_max, box.row_min],
            [box.col_max, box.row_max],
            [box.col_min, box.row_max],
            [box.col_min, box.row_min],
        ],
    )
    assert roi.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        wrist.SOPInstanceUID
    )
    (illustration,) = _children(roi[0], "121200")  # Illustration of ROI: the SC
    sc = captures[str(wrist.SOPInstanceUID)]
    assert illustration.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sc.SOPInstanceUID

    (other,) = content.get_image_measurement_groups()
    (not_done,) = other.get_qualitative_evaluations(name=FRACTURE)
    assert not_done.value.value == NOT_DONE.value
    (reason,) = _children(other[0], "121106")  # Comment
    assert findings[1].reason is not None and findings[1].reason in reason.TextValue
    assert other.source_images[0].referenced_sop_instance_uid == chest.SOPInstanceUID
    assert not other.finding_sites  # "other" has no code of CID 4031


def test_negative_and_indeterminate_findings(
    study: tuple[list[Dataset], list[Finding], dict[str, Dataset]],
) -> None:
    sources, _, _ = study
    wrist = sources[0]
    for present, expected in ((False, codes.SCT.Absent), (None, codes.SCT.Indeterminate)):
        finding = analysed_finding(wrist, probability=0.2, present=present, laterality=None)
        finding = Finding(**{**_fields(finding), "hotspot": None})  # negatives: whole image
        sr = build_structured_report(
            [wrist],
            [finding],
            {},
            series_instance_uid=generate_uid(),
            series_number=9901,
            series_description="boneflow test",
        )
        (roi,) = hd.sr.srread(io.BytesIO(to_bytes(sr))).content.get_planar_roi_measurement_groups()
        assert roi.get_qualitative_evaluations(name=FRACTURE)[0].value.value == expected.value
        assert roi.finding_sites[0].laterality is None
        rows, cols = int(wrist.Rows), int(wrist.Columns)
        assert roi.roi.value.max(axis=0).tolist() == [cols, rows]  # the analysed area


def test_reanalysis_references_the_superseded_report(
    study: tuple[list[Dataset], list[Finding], dict[str, Dataset]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = build(study)
    second = strict_read(to_bytes(build(study, predecessor=first)), monkeypatch)
    reference = second.PredecessorDocumentsSequence[0]
    assert reference.StudyInstanceUID == first.StudyInstanceUID
    item = reference.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert item.ReferencedSOPInstanceUID == first.SOPInstanceUID


def test_findings_must_match_sources(
    study: tuple[list[Dataset], list[Finding], dict[str, Dataset]],
) -> None:
    sources, findings, captures = study
    with pytest.raises(ValueError, match="one to one"):
        build_structured_report(
            sources[:1],
            findings,
            captures,
            series_instance_uid=generate_uid(),
            series_number=1,
            series_description="x",
        )


def _children(item: Dataset, code_value: str) -> list[Dataset]:
    return [child for child in item.get("ContentSequence", []) if _concept(child) == code_value]


def _concept(item: Dataset) -> str:
    """The code value of an item's concept name (highdicom wraps it as CodedConcept)."""
    concept = item.ConceptNameCodeSequence[0]
    return str(concept.value if isinstance(concept, hd.sr.CodedConcept) else concept.CodeValue)


def _flatten(item: Dataset) -> list[tuple[str, str]]:
    """(concept code, text/UID value) of every TEXT and UIDREF item below ``item``."""
    found: list[tuple[str, str]] = []
    for child in item.get("ContentSequence", []):
        code = _concept(child)
        if child.ValueType == "TEXT":
            found.append((code, str(child.TextValue)))
        elif child.ValueType == "UIDREF":
            found.append((code, str(child.UID)))
        found.extend(_flatten(child))
    return found


def _fields(finding: Finding) -> dict[str, object]:
    return {name: getattr(finding, name) for name in Finding.__dataclass_fields__}


def test_hot_spot_outside_the_image_falls_back_to_the_whole_image() -> None:
    wrist = radiograph("RG3_UNCR.dcm")
    finding = analysed_finding(wrist)
    outside = Finding(**{**_fields(finding), "hotspot": BoundingBox(5000, 5000, 6000, 6000)})
    sr = build_structured_report(
        [wrist],
        [outside],
        {},
        series_instance_uid=generate_uid(),
        series_number=9901,
        series_description="boneflow test",
    )
    (roi,) = hd.sr.srread(io.BytesIO(to_bytes(sr))).content.get_planar_roi_measurement_groups()
    assert roi.roi.value.min(axis=0).tolist() == [0, 0]
    assert roi.roi.value.max(axis=0).tolist() == [int(wrist.Columns), int(wrist.Rows)]


def test_names_in_any_character_set_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = radiograph("RG3_UNCR.dcm")
    source.SpecificCharacterSet = "ISO_IR 100"
    source.PatientName = "Müller^Renée"
    source.ReferringPhysicianName = "Ørsted^Hans"
    objects = build_result_objects([source], [analysed_finding(source)])
    for ds in objects.datasets:
        data = to_bytes(ds)
        assert dciodvfy(data, tmp_path)[0] == []
        back = strict_read(data, monkeypatch)
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert str(back.PatientName) == "Müller^Renée"
        assert str(back.ReferringPhysicianName) == "Ørsted^Hans"
