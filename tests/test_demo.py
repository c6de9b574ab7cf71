"""`boneflow demo`: its parts on real values, and the whole round trip as a subprocess."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from rich.console import Console

from boneflow.config import CallerRule, Destination, Settings, load_settings
from boneflow.db.audit import Audit, DispatchStatus, ResultStatus
from boneflow.db.migrate import upgrade
from boneflow.demo import (
    MARKER,
    DemoError,
    Sample,
    _fresh,
    _progress,
    print_findings,
    wait_for_results,
    write_png,
)
from boneflow.local_node import node_environment


def _sample(label: str, study: str | None = None) -> Sample:
    return Sample(
        label=label,
        path=Path(f"{label}.dcm"),
        sop_instance_uid=generate_uid(),
        study_instance_uid=study or generate_uid(),
        truth="wrist, fracture",
    )


def test_node_environment_reproduces_the_settings_and_drops_the_callers_keys(
    tmp_path: Path,
) -> None:
    settings = Settings(
        ae_title="BONEFLOW",
        port=40123,
        data_dir=tmp_path / "node",
        model_dir=tmp_path / "models",
        settle_seconds=1.5,
        destinations=(Destination("dimse", "ORTHANC", "127.0.0.1", 4242),),
        allowed_callers=(CallerRule("ORTHANC", "127.0.0.1"), CallerRule("OTHER")),
        device="cpu",
    )
    base = {"PATH": "/usr/bin", "BONEFLOW_BROKER_URL": "redis://elsewhere:6379/0"}
    env = node_environment(settings, base)
    assert env["PATH"] == "/usr/bin"
    assert env["BONEFLOW_BROKER_URL"] == ""  # embedded, not the caller's broker
    assert load_settings({}, env, None) == settings


def test_fresh_clears_only_folders_the_demo_made(tmp_path: Path) -> None:
    made = _fresh(tmp_path / "node")
    (made / "leftover.db").write_text("x")
    assert _fresh(tmp_path / "node") == made
    assert sorted(p.name for p in made.iterdir()) == [MARKER]
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("keep me")
    with pytest.raises(DemoError, match="not made by the demo"):
        _fresh(foreign)
    assert (foreign / "thesis.txt").read_text() == "keep me"


def test_progress_waits_for_every_result_and_every_delivery(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    audit = Audit.open(url)
    fractured, chest = _sample("wrist"), _sample("chest")
    try:
        assert _progress(audit, [fractured, chest]) == ({}, 0)
        audit.result_recorded(
            sop_instance_uid=fractured.sop_instance_uid,
            study_instance_uid=fractured.study_instance_uid,
            status=ResultStatus.ANALYSED,
            body_part="wrist",
            body_part_confidence=0.97,
            fracture_probability=0.91,
            fracture_present=True,
            threshold=0.5,
            models={"router": "router@1", "fracture": "arm@1"},
        )
        found, pending = _progress(audit, [fractured, chest])
        assert set(found) == {fractured.sop_instance_uid}
        assert found[fractured.sop_instance_uid].models == "router@1, arm@1"
        assert pending == 2  # its SR and its SC are not even in the outbox yet
        items = [
            audit.outbox_item_added(
                destination="ORTHANC@127.0.0.1:4242",
                sop_instance_uid=generate_uid(),
                sop_class_uid=uid,
                path="x.dcm",
                study_instance_uid=fractured.study_instance_uid,
            )
            for uid in ("1.2.840.10008.5.1.4.1.1.88.33", str(SecondaryCaptureImageStorage))
        ]
        audit.dispatch_attempted(items[0], DispatchStatus.FAILED, error="down")
        assert _progress(audit, [fractured, chest])[1] == 2
        audit.dispatch_attempted(items[0], DispatchStatus.SENT)
        audit.dispatch_attempted(items[1], DispatchStatus.SENT)
        assert _progress(audit, [fractured, chest])[1] == 0
        audit.result_recorded(
            sop_instance_uid=chest.sop_instance_uid,
            study_instance_uid=chest.study_instance_uid,
            status=ResultStatus.NOT_ANALYSED,
            body_part="other",
            body_part_confidence=0.99,
            reason="no fracture model covers other",
        )
        found, pending = _progress(audit, [fractured, chest])
        assert len(found) == 2
        assert pending == 1  # the chest study's SR
    finally:
        audit.close()


def test_wait_for_results_names_what_is_missing_when_time_is_up(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    upgrade(settings.resolved_database_url)
    with pytest.raises(DemoError, match=r"0/1 images have results"):
        wait_for_results(settings, [_sample("wrist")], Console(file=io.StringIO()), 0.5)


def _image(photometric: str, pixels: np.ndarray) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def test_write_png_keeps_colour_and_makes_monochrome1_bone_bright(tmp_path: Path) -> None:
    import cv2

    rgb = np.zeros((8, 12, 3), np.uint8)
    rgb[..., 0] = 200  # red heat
    write_png(_image("RGB", rgb), tmp_path / "sc.png")
    back = cv2.imread(str(tmp_path / "sc.png"), cv2.IMREAD_UNCHANGED)
    assert back.shape == (8, 12, 3)
    assert back[0, 0].tolist() == [0, 0, 200]  # BGR on disk
    mono = np.full((6, 6), 4000, np.uint16)
    mono[2:4, 2:4] = 100  # low stored values are bright in MONOCHROME1
    write_png(_image("MONOCHROME1", mono), tmp_path / "cr.png")
    back = cv2.imread(str(tmp_path / "cr.png"), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint8
    assert back[3, 3] == 255 and back[0, 0] == 0


def test_findings_table_lists_every_image_with_its_call_or_reason() -> None:
    from boneflow.demo import SampleResult

    wrist, chest = _sample("synthetic-1-wrist"), _sample("real-RG1")
    results = [
        SampleResult(wrist, "analysed", "wrist", 0.97, 0.912, True, 0.5, "r@1, arm@1", None),
        SampleResult(chest, "not_analysed", "other", 0.99, None, None, None, "r@1", "no model"),
    ]
    out = io.StringIO()
    print_findings(results, Console(file=out, width=160))
    text = out.getvalue()
    assert "synthetic-1-wrist" in text and "real-RG1" in text
    assert "0.912 (thr 0.50)" in text and "fracture" in text and "r@1, arm@1" in text
    assert "not analysed" in text and "no model" in text
    assert "not for diagnostic use" in text


# ---- the whole demo -----------------------------------------------------------------------


def _check_demo_output(out_dir: Path, printed: str) -> None:
    """Every sample has a finding in the table and in findings.json, with result files."""
    import json

    summary = json.loads((out_dir / "findings.json").read_text())
    images = summary["images"]
    labels = [image["image"] for image in images]
    assert len(labels) == 5 and labels[-1] == "real-RG3_UNCR"
    assert sum(label.startswith("synthetic-") for label in labels) == 4
    for image in images:
        assert image["image"] in printed
        assert image["status"] in {"analysed", "not_analysed"}
        assert image["body_part"]
        folder = out_dir / "results" / image["image"]
        srs = list(folder.glob("sr-*.dcm"))
        scs = list(folder.glob("sc-*.dcm"))
        assert len(srs) == 1, f"{image['image']}: one SR"
        if image["status"] == "analysed":
            assert image["fracture_probability"] is not None
            assert f"{image['fracture_probability']:.3f}" in printed
            assert len(scs) == 1 and scs[0].with_suffix(".png").is_file()
            sc = pydicom.dcmread(scs[0])
            assert sc.StudyInstanceUID == image["study_instance_uid"]
        else:
            assert image["reason"] and not scs
        sr = pydicom.dcmread(srs[0])
        assert sr.StudyInstanceUID == image["study_instance_uid"]
    assert "not for diagnostic use" in printed


def _no_process_left(folder: Path) -> None:
    """No process runs whose command line or environment names ``folder``."""
    import os

    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if str(folder).encode() in text:
            left.append(entry.name)
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="module")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.model_fixtures import make_test_models

    model_dir = tmp_path_factory.mktemp("demo-models")
    make_test_models(model_dir)
    return model_dir


@pytest.mark.integration
@pytest.mark.slow
def test_boneflow_demo_runs_the_round_trip_through_orthanc(
    tmp_path: Path, demo_model_dir: Path
) -> None:
    import os
    import subprocess
    import sys

    from boneflow.orthanc import orthanc_executable

    if orthanc_executable() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Orthanc is required in CI: apt-get install orthanc")
        pytest.skip("Orthanc is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEFLOW_")}
    env |= {"BONEFLOW_MODEL_DIR": str(demo_model_dir), "BONEFLOW_DEVICE": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "boneflow", "demo", "--out", str(tmp_path / "demo")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Orthanc explorer: http://127.0.0.1:" in done.stderr
    _check_demo_output(tmp_path / "demo", done.stdout)
    _no_process_left(tmp_path)


@pytest.mark.integration
@pytest.mark.slow
def test_demo_without_orthanc_uses_the_built_in_receiver(
    tmp_path: Path, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import boneflow.demo

    monkeypatch.setattr(boneflow.demo, "orthanc_executable", lambda: None)  # "not installed"
    settings = Settings(data_dir=tmp_path / "data", model_dir=demo_model_dir, device="cpu")
    assert boneflow.demo.run_demo(settings, tmp_path / "demo") == 0
    printed = capsys.readouterr()
    assert "built-in receiver" in printed.err
    assert any((tmp_path / "demo" / "received").rglob("*.dcm"))
    _check_demo_output(tmp_path / "demo", printed.out)
    _no_process_left(tmp_path)


def test_models_are_trained_only_when_a_router_or_a_fracture_model_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boneflow.training.demo
    from boneflow.demo import ensure_demo_models
    from boneflow.models.registry import Registry
    from tests.model_fixtures import ROUTER, make_test_models

    trained: list[Path] = []

    def record(settings: Settings, progress: bool = True) -> list[object]:
        trained.append(settings.resolved_model_dir)  # training itself is tested in training/
        return []

    monkeypatch.setattr(boneflow.training.demo, "train_demo_models", record)
    quiet = Console(file=io.StringIO())
    settings = Settings(data_dir=tmp_path, model_dir=tmp_path / "models")
    assert ensure_demo_models(settings, quiet) == (tmp_path / "models").resolve()
    assert trained == [(tmp_path / "models").resolve()]  # nothing registered
    make_test_models(tmp_path / "models")
    registry = Registry(tmp_path / "models")
    assert registry.router().name == ROUTER
    ensure_demo_models(settings, quiet)
    assert len(trained) == 1  # router and fracture models exist: no training
    for manifest in registry.list():  # a router alone (training interrupted) is not enough
        if manifest.task == "fracture":
            shutil.rmtree(tmp_path / "models" / manifest.name)
    ensure_demo_models(settings, quiet)
    assert len(trained) == 2
