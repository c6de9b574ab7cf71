"""Data set adapters, patient-level splits, duplicate and corrupt-file detection."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from boneflow.findings import BODY_PARTS
from boneflow.training.datasets import (
    DatasetError,
    Record,
    load_records,
    parse_class_name,
    prepare_dataset,
    read_image,
    split_by_patient,
)
from tests.training.conftest import write_dicom, write_png


def test_mura_adapter_maps_regions_labels_patients_and_splits(mura_tree: Path) -> None:
    records = load_records("mura", mura_tree)
    assert len(records) == 8
    by_name = {(r.path.parent.parent.name, r.path.name, r.body_part) for r in records}
    assert ("patient00003", "image1.png", "hand") in by_name  # XR_FINGER -> hand
    wrist = [r for r in records if r.patient_id == "patient00001"]
    assert {r.body_part for r in wrist} == {"wrist"} and all(r.fractured for r in wrist)
    assert all(r.path.is_file() for r in records)
    assert {r.split for r in records if r.patient_id == "patient11185"} == {"test"}
    assert {r.split for r in records if r.patient_id != "patient11185"} == {None}
    prepared = prepare_dataset(records, "mura")
    # MURA valid is the test split; MURA train is divided into train and val by patient
    assert {r.patient_id for r in prepared.split("test")} == {"patient11185"}
    assert prepared.split("train") and prepared.split("val")
    assert _patients_disjoint(prepared.records)


def test_mura_accepts_the_folder_itself(mura_tree: Path) -> None:
    assert len(load_records("mura", mura_tree / "MURA-v1.1")) == 8


def test_fracatlas_adapter(fracatlas_tree: Path) -> None:
    records = {r.path.name: r for r in load_records("fracatlas", fracatlas_tree)}
    assert records["IMG0000001.jpg"].body_part == "hand" and records["IMG0000001.jpg"].fractured
    assert records["IMG0000002.jpg"].body_part == "lower_leg"
    assert records["IMG0000002.jpg"].fractured is False
    assert records["IMG0000003.jpg"].body_part == "other"
    assert records["IMG0000004.jpg"].body_part is None  # mixed regions
    assert records["IMG0000005.jpg"].body_part == "shoulder"
    assert records["IMG0000003.jpg"].path.parent.name == "Fractured"


def test_folders_adapter_keeps_the_given_splits(folders_tree: Path) -> None:
    records = load_records("folders", folders_tree)
    assert len(records) == 18
    assert {r.split for r in records} == {"train", "val", "test"}
    assert sum(1 for r in records if r.fractured) == 9
    assert all(r.body_part is None for r in records)
    prepared = prepare_dataset(records, "folders")
    assert prepared.report.split_counts == {"train": 6, "val": 6, "test": 6}


def test_folders_adapter_without_val_carves_one_from_train(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for part in ("hand", "wrist"):
            for i in range(10):
                write_png(tmp_path / split / part / f"p{i}__img.png", hash((split, part, i)) % 9999)
    prepared = prepare_dataset(load_records("folders", tmp_path), "folders")
    assert {r.body_part for r in prepared.records} == {"hand", "wrist"}
    assert len(prepared.split("val")) >= 2 and len(prepared.split("test")) == 20
    assert _patients_disjoint(prepared.records)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fractured", (None, True)),
        ("not fractured", (None, False)),
        ("Non_fractured", (None, False)),
        ("XR_WRIST", ("wrist", None)),
        ("lower_leg", ("lower_leg", None)),
        ("elbow_positive", ("elbow", True)),
        ("chest", ("other", None)),
        ("misc", (None, None)),
    ],
)
def test_class_folder_names(name: str, expected: tuple[str | None, bool | None]) -> None:
    assert parse_class_name(name) == expected


def test_dicom_csv_adapter_reads_ids_from_headers(tmp_path: Path) -> None:
    write_dicom(tmp_path / "a" / "1.dcm", 1, "PAT-A", "1.2.3.1")
    write_dicom(tmp_path / "b" / "2.dcm", 2, "PAT-B", "1.2.3.2")
    with (tmp_path / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "body_part", "fractured"])
        writer.writerow(["a/1.dcm", "wrist", "1"])
        writer.writerow(["b/2.dcm", "hand", "0"])
    records = load_records("dicom-csv", tmp_path)
    assert [(r.patient_id, r.study_id, r.body_part, r.fractured) for r in records] == [
        ("PAT-A", "1.2.3.1", "wrist", True),
        ("PAT-B", "1.2.3.2", "hand", False),
    ]
    image = read_image(records[0])
    assert image.shape == (32, 40) and image.dtype == np.float32
    assert 0.0 <= image.min() < image.max() <= 1.0


def test_dicom_csv_rejects_unknown_body_part(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("file,body_part\nx.dcm,kneecap\n")
    with pytest.raises(DatasetError, match="kneecap"):
        load_records("dicom-csv", tmp_path)


def test_synth_adapter_reads_labels_and_inverts_monochrome1(tmp_path: Path) -> None:
    write_png(tmp_path / "img0.png", 0, dtype=np.uint16)
    shutil.copy(tmp_path / "img0.png", tmp_path / "img1.png")
    header = "file,body_part,fractured,fracture_type,difficulty,patient_id,"
    header += "study_instance_uid,photometric,bits_stored\n"
    (tmp_path / "labels.csv").write_text(
        header
        + "img0.png,wrist,1,hairline,hard,P1,1.2.1,MONOCHROME2,12\n"
        + "img1.png,other,0,,none,P2,1.2.2,MONOCHROME1,12\n"
    )
    first, second = load_records("synth", tmp_path)
    assert (first.body_part, first.fractured, first.difficulty) == ("wrist", True, "hard")
    assert (second.body_part, second.fractured, second.photometric) == (
        "other",
        False,
        "MONOCHROME1",
    )
    a, b = read_image(first), read_image(second)
    np.testing.assert_allclose(a + b, 1.0, atol=1e-6)  # same stored values, inverted
    assert a.max() <= 1.0 and a.max() > 0.9  # 12-bit values scaled by 4095, not 65535


def test_unknown_format_and_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown data set format"):
        load_records("imagenet", tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_records("mura", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"dataset\.csv"):
        load_records("fracatlas", tmp_path)


def test_duplicates_and_corrupt_files_are_dropped_and_reported(folders_tree: Path) -> None:
    train = folders_tree / "train" / "fractured"
    shutil.copy(train / "img0.png", train / "zz_copy_of_img0.png")
    shutil.copy(train / "img1.png", folders_tree / "train" / "not fractured" / "relabelled.png")
    (train / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    records = load_records("folders", folders_tree)
    prepared = prepare_dataset(records, "folders")
    report = prepared.report
    assert report.found == 21
    assert [Path(p).name for p, _ in report.corrupt] == ["broken.png"]
    assert sorted(Path(p).name for p, _ in report.duplicates) == [
        "relabelled.png",
        "zz_copy_of_img0.png",
    ]
    assert [Path(p).name for p, _ in report.label_conflicts] == ["relabelled.png"]
    assert len(prepared.records) == 18
    summary = report.to_dict()
    assert summary["corrupt_count"] == 1 and summary["duplicate_count"] == 2
    assert len(str(summary["fingerprint"])) == 64


def test_fingerprint_changes_with_the_data(folders_tree: Path) -> None:
    before = prepare_dataset(load_records("folders", folders_tree), "x").report.fingerprint
    write_png(folders_tree / "train" / "fractured" / "new.png", 999)
    after = prepare_dataset(load_records("folders", folders_tree), "x").report.fingerprint
    assert before != after


@pytest.mark.parametrize("seed", range(40))
def test_patient_level_split_property(seed: int) -> None:
    """Random data sets: every record gets a split, no patient is in two, presets hold."""
    rng = np.random.default_rng(seed)
    patients = [f"P{i}" for i in range(int(rng.integers(1, 60)))]
    records = []
    for i in range(int(rng.integers(1, 300))):
        patient = str(rng.choice(patients))
        preset = rng.choice([None, None, None, "test", "val"]) if seed % 3 == 0 else None
        records.append(
            Record(
                Path(f"{i}.png"),
                str(rng.choice(BODY_PARTS)),
                bool(rng.random() < 0.5),
                patient,
                f"{patient}/s{i % 3}",
                split=preset,
            )
        )
    result = split_by_patient(records, seed=seed)
    assert len(result) == len(records)
    assert all(r.split in {"train", "val", "test"} for r in result)
    assert _patients_disjoint(result)
    first_preset: dict[str, str] = {}
    for r in records:
        if r.split is not None:
            first_preset.setdefault(r.patient_id, r.split)
    for original, split in zip(records, result, strict=True):
        assert original.path == split.path
        if original.patient_id in first_preset:
            assert split.split == first_preset[original.patient_id]
    if not first_preset and len({r.patient_id for r in records}) >= 20:
        shares = {
            s: sum(r.split == s for r in result) / len(result) for s in ("train", "val", "test")
        }
        assert shares["train"] > 0.5 and shares["val"] > 0.05 and shares["test"] > 0.05
    assert split_by_patient(records, seed=seed) == result  # deterministic


def _patients_disjoint(records: tuple[Record, ...] | list[Record]) -> bool:
    splits: dict[str, set[str | None]] = {}
    for r in records:
        splits.setdefault(r.patient_id, set()).add(r.split)
    return all(len(s) == 1 for s in splits.values())
