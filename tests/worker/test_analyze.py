"""``boneflow analyze``: the real command on RG1/RG3 in every transfer syntax, and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from boneflow.config import Settings
from boneflow.worker.analyze import analyze_files

NAMES = [f"RG{n}_{s}.dcm" for n in (1, 3) for s in ("UNCR", "J2KR", "J2KI")]


def _path(name: str) -> Path:
    found = get_testdata_file(name)
    assert found is not None
    return Path(str(found))


def test_analyze_json_on_every_syntax(model_dir: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BONEFLOW_DATA_DIR": str(tmp_path),
        "BONEFLOW_MODEL_DIR": str(model_dir),
        "BONEFLOW_DEVICE": "cpu",
    }
    done = subprocess.run(
        [sys.executable, "-m", "boneflow", "analyze", *map(str, map(_path, NAMES)), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert [Path(r["path"]).name for r in records] == NAMES
    for record in records:
        assert record["models"]["router"] == {"name": "test-router", "version": "1"}
        assert record["body_part_confidence"] > 0
        assert {"preprocess", "router", "total"} <= set(record["timings_ms"])
        if record["path"].endswith(("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")):
            assert record["status"] == "not_analysed"
            assert record["body_part"] == "other"
            assert record["fracture_probability"] is None
            assert "no fracture model" in record["reason"]
        else:
            assert record["status"] == "analysed"
            assert record["body_part"] == "lower_leg"
            assert record["models"]["fracture"] == {"name": "test-fracture-leg", "version": "1"}
            assert 0.0 <= record["fracture_probability"] <= 1.0
            assert record["fracture_present"] == (record["fracture_probability"] >= 0.5)
            assert record["threshold"] == 0.5
            assert record["laterality"] == "R"
            assert {"fracture", "heatmap"} <= set(record["timings_ms"])
    leg = [r["fracture_probability"] for r in records if r["body_part"] == "lower_leg"]
    assert leg[0] == leg[1]  # lossless JPEG 2000 = uncompressed
    assert abs(leg[0] - leg[2]) < 0.02


@pytest.fixture
def local(settings: Settings, model_dir: Path) -> Settings:
    return dataclasses.replace(settings, model_dir=model_dir, device="cpu")


def test_table_output_and_result_files(
    local: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    leg, chest = _path("RG3_UNCR.dcm"), _path("RG1_UNCR.dcm")
    assert analyze_files(local, [leg, chest], out, False) == 0
    printed = capsys.readouterr()
    assert "lower_leg" in printed.out
    assert "not analysed" in printed.out
    for source in (leg, chest):
        study = str(pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID)
        files = sorted(p.name for p in (out / study).iterdir())
        kinds = sorted(name.split("-")[0] + name[name.rindex(".") :] for name in files)
        if source == leg:  # analysed: SR + one SC (and its PNG)
            assert kinds == ["SC.dcm", "SC.png", "SR.dcm"]
        else:  # not analysed: the SR says so, no SC
            assert kinds == ["SR.dcm"]
        for name in files:
            if name.endswith(".dcm"):
                written = pydicom.dcmread(out / study / name)
                assert str(written.StudyInstanceUID) == study


def test_folders_are_searched_and_bad_files_reported(
    local: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "leg.dcm").write_bytes(_path("RG3_J2KI.dcm").read_bytes())
    (folder / "notes.txt").write_text("not an image")
    code = analyze_files(local, [folder, tmp_path / "missing.dcm"], None, True)
    assert code == 1
    records = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert records["leg.dcm"]["status"] == "analysed"
    assert records["notes.txt"]["status"] == "failed"
    assert "not a readable DICOM file" in records["notes.txt"]["reason"]
    assert records["missing.dcm"]["reason"] == "no such file or folder"


def test_no_models_exits_2_with_a_hint(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = dataclasses.replace(settings, model_dir=tmp_path / "none", device="cpu")
    assert analyze_files(empty, [_path("RG1_UNCR.dcm")], None, True) == 2
    assert "boneflow train --demo" in capsys.readouterr().err
