"""Result objects of a study: built from real radiographs, written as files and PNGs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from boneflow import __version__
from boneflow.dicom.results import (
    SC_SERIES_NUMBER,
    SR_SERIES_NUMBER,
    ResultObjects,
    build_result_objects,
    series_description,
    to_bytes,
    write_heatmap_pngs,
    write_result_files,
)
from boneflow.findings import Finding, ModelId
from tests.dicom.results_data import (
    ROUTER,
    WRIST_MODEL,
    analysed_finding,
    dciodvfy,
    not_analysed_finding,
    radiograph,
    strict_read,
)


def one_study() -> tuple[list[Dataset], list[Finding]]:
    """Two analysed images (RG3 uncompressed and JPEG 2000) and one chest, one study."""
    wrist, wrist_j2k, chest = (
        radiograph("RG3_UNCR.dcm"),
        radiograph("RG3_J2KR.dcm"),
        radiograph("RG1_UNCR.dcm"),
    )
    for ds in (wrist_j2k, chest):
        ds.StudyInstanceUID = wrist.StudyInstanceUID
    # A second image, not a duplicate (a fixed UID, so that every call builds the same study).
    wrist_j2k.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["boneflow", "RG3 twin"])
    sources = [wrist, wrist_j2k, chest]
    findings = [
        analysed_finding(wrist),
        analysed_finding(wrist_j2k, probability=0.12, present=False),
        not_analysed_finding(chest),
    ]
    return sources, findings


@pytest.fixture(scope="module")
def objects() -> ResultObjects:
    sources, findings = one_study()
    return build_result_objects(sources, findings)


def test_one_sr_and_one_sc_per_analysed_image(objects: ResultObjects) -> None:
    sources, findings = one_study()
    assert len(objects.secondary_captures) == 2
    referenced = [
        sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in objects.secondary_captures
    ]
    assert referenced == [findings[0].sop_instance_uid, findings[1].sop_instance_uid]
    assert {ds.StudyInstanceUID for ds in objects.datasets} == {sources[0].StudyInstanceUID}
    assert objects.sr.SeriesNumber == SR_SERIES_NUMBER
    assert {sc.SeriesNumber for sc in objects.secondary_captures} == {SC_SERIES_NUMBER}
    assert len({sc.SeriesInstanceUID for sc in objects.secondary_captures}) == 1
    assert objects.sr.SeriesInstanceUID != objects.secondary_captures[0].SeriesInstanceUID
    assert [sc.InstanceNumber for sc in objects.secondary_captures] == [1, 2]
    assert objects.datasets[-1] is objects.sr  # the SR goes last, after what it references


def test_every_object_is_valid(
    objects: ResultObjects, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for ds in objects.datasets:
        data = to_bytes(ds)
        errors, _ = dciodvfy(data, tmp_path)
        assert errors == [], ds.SOPClassUID
        strict_read(data, monkeypatch)


def test_files_and_pngs_are_written_completely(objects: ResultObjects, tmp_path: Path) -> None:
    folder = tmp_path / "results" / "study"
    paths = write_result_files(objects, folder)
    assert [p.name.split("-")[0] for p in paths] == ["SC", "SC", "SR"]
    for path, ds in zip(paths, objects.datasets, strict=True):
        assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    pngs = write_heatmap_pngs(objects, folder)
    assert len(pngs) == 2
    image = cv2.imread(str(pngs[0]))
    sc = objects.secondary_captures[0]
    assert image.shape == (sc.Rows, sc.Columns, 3)
    assert not list(folder.glob(".tmp-*"))  # no temporary file left behind
    assert write_result_files(objects, folder) == paths  # writing again replaces in place


def test_series_description_names_models_and_fits_an_lo() -> None:
    source = radiograph("RG3_UNCR.dcm")
    text = series_description("SR", [analysed_finding(source)])
    assert text == f"boneflow {__version__} SR {ROUTER} {WRIST_MODEL}"
    long = analysed_finding(source)
    long = Finding(
        **{
            **{name: getattr(long, name) for name in Finding.__dataclass_fields__},
            "fracture_model": ModelId("a-very-long-fracture-model-name-for-wrists", "10.20.30"),
        }
    )
    assert len(series_description("Grad-CAM", [long])) == 64


def test_sources_from_two_studies_are_refused() -> None:
    sources, findings = one_study()
    sources[2].StudyInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(ValueError, match="2 studies"):
        build_result_objects(sources, findings)


def test_findings_without_sources_are_refused() -> None:
    sources, findings = one_study()
    with pytest.raises(ValueError, match="one to one"):
        build_result_objects(sources[:2], findings)


def test_unusual_sources_still_give_valid_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_orientation = radiograph("RG3_UNCR.dcm")
    del no_orientation.PatientOrientation
    with_spacing = radiograph("RG3_UNCR.dcm")  # gets the TID 1603 library descriptors
    with_spacing.ImagerPixelSpacing = [0.15, 0.15]
    with_spacing.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["boneflow", "spacing"])
    broken_map = analysed_finding(no_orientation)
    assert broken_map.heatmap is not None
    broken_map.heatmap[:50, :50] = np.nan  # a bad Grad-CAM pixel must not break the SC

    objects = build_result_objects(
        [no_orientation, with_spacing], [broken_map, analysed_finding(with_spacing)]
    )
    for ds in objects.datasets:
        data = to_bytes(ds)
        assert dciodvfy(data, tmp_path)[0] == []
        strict_read(data, monkeypatch)
    assert objects.secondary_captures[0].PatientOrientation == ""
    assert objects.secondary_captures[1].PatientOrientation == with_spacing.PatientOrientation
    assert no_orientation.Modality == with_spacing.Modality == "CR"  # sources untouched


def test_a_study_with_nothing_analysed_gets_an_sr_only() -> None:
    chest = radiograph("RG1_UNCR.dcm")
    objects = build_result_objects([chest], [not_analysed_finding(chest)])
    assert objects.secondary_captures == ()
    assert objects.datasets == (objects.sr,)
