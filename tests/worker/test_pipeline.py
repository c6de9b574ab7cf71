"""worker.pipeline: spooled files → findings, with one audited result per image."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from sqlalchemy import select

from boneflow.config import Settings
from boneflow.db.audit import Audit, ResultStatus
from boneflow.db.schema import Result
from boneflow.errors import ModelNotFound
from boneflow.findings import BODY_PARTS, FindingStatus
from boneflow.models.networks import build_network
from boneflow.models.registry import ModelManifest, Registry
from boneflow.worker.pipeline import (
    UNDECODABLE,
    analyse_datasets,
    get_analyzer,
    load_datasets,
    to_image_input,
)
from tests.model_fixtures import make_test_models


def _path(name: str) -> Path:
    found = get_testdata_file(name)
    assert found is not None
    return Path(str(found))


def test_load_datasets_skips_what_is_not_dicom(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    datasets = load_datasets([_path("RG1_UNCR.dcm"), junk, tmp_path / "gone.dcm"])
    assert [str(ds.Modality) for ds in datasets] == ["CR"]


def test_to_image_input_reads_the_header() -> None:
    image = to_image_input(pydicom.dcmread(_path("RG3_J2KR.dcm")))
    assert image.body_part_hint == "EXTREMITY"
    assert image.laterality == "R"
    assert image.pixels.shape == (1760, 1760)


def test_analyse_datasets_records_one_result_per_image(
    settings: Settings, audit: Audit, model_dir: Path
) -> None:
    settings = dataclasses.replace(settings, model_dir=model_dir, device="cpu")
    chest, leg, broken = load_datasets(
        [_path("RG1_J2KR.dcm"), _path("RG3_UNCR.dcm"), _path("RG3_J2KR.dcm")]
    )
    broken.PixelData = encapsulate([b"\x00" * 512])  # a decoder failure, not a crash
    findings = analyse_datasets(settings, audit, [chest, leg, broken], job_id=7)

    assert [f.status for f in findings] == [
        FindingStatus.NOT_ANALYSED,
        FindingStatus.ANALYSED,
        FindingStatus.NOT_ANALYSED,
    ]
    assert findings[2].reason is not None
    assert findings[2].reason.startswith(UNDECODABLE)
    with audit.session() as session:
        rows = session.scalars(select(Result).order_by(Result.id)).all()
        recorded = [
            (r.sop_instance_uid, r.status, r.job_id, r.study_instance_uid, r.body_part)
            for r in rows
        ]
        leg_row = rows[1]
        models, timings = json.loads(leg_row.models), json.loads(leg_row.timings_ms)
        probability, threshold = leg_row.fracture_probability, leg_row.threshold
    assert recorded == [
        (chest.SOPInstanceUID, ResultStatus.NOT_ANALYSED, 7, chest.StudyInstanceUID, "other"),
        (leg.SOPInstanceUID, ResultStatus.ANALYSED, 7, leg.StudyInstanceUID, "lower_leg"),
        (broken.SOPInstanceUID, ResultStatus.FAILED, 7, broken.StudyInstanceUID, None),
    ]
    assert models == {"router": "test-router@1", "fracture": "test-fracture-leg@1"}
    assert {"preprocess", "router", "fracture", "total"} <= set(timings)
    assert probability == pytest.approx(findings[1].fracture_probability)
    assert threshold == 0.5
    assert audit.verify() == []  # the chain still verifies after our appends


def test_analyzer_is_cached_per_process_until_a_new_router_arrives(
    settings: Settings, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    make_test_models(models)
    settings = dataclasses.replace(settings, model_dir=models, device="cpu")
    first = get_analyzer(settings)
    assert get_analyzer(settings) is first
    Registry(models).register(
        build_network("resnet10", len(BODY_PARTS)),
        ModelManifest(
            name="test-router",
            version="2",
            task="router",
            architecture="resnet10",
            labels=BODY_PARTS,
            body_parts=BODY_PARTS,
            threshold=0.0,
            created_at="2026-06-01T00:00:00+00:00",
        ),
    )
    second = get_analyzer(settings)
    assert second is not first
    assert second.router_manifest.version == "2"


def test_no_models_is_a_clear_error(settings: Settings, tmp_path: Path) -> None:
    settings = dataclasses.replace(settings, model_dir=tmp_path / "empty", device="cpu")
    with pytest.raises(ModelNotFound, match="no body-part router"):
        analyse_datasets(settings, None, load_datasets([_path("RG1_UNCR.dcm")]))
