"""Fixtures of the training tests: small image trees in the layouts of real data sets."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
WriteImage = Callable[[Path], Path]


def write_png(path: Path, seed: int, size: int = 48, dtype: type = np.uint8) -> Path:
    """A small unique noise image (unique content, so no accidental duplicates)."""
    rng = np.random.default_rng(seed)
    top = 255 if dtype is np.uint8 else 4095
    pixels = rng.integers(0, top, size=(size, size + 8)).astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels)
    return path


def write_dicom(path: Path, seed: int, patient_id: str, study_uid: str) -> Path:
    """A minimal valid CR instance with a 32 x 40 MONOCHROME2 image."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4095, size=(32, 40)).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def mura_tree(tmp_path: Path) -> Path:
    """MURA-v1.1 layout: 3 train patients (2 regions), 1 valid patient, CSVs of paths."""
    base = tmp_path / "MURA-v1.1"
    rows: dict[str, list[str]] = {"train": [], "valid": []}
    seed = 0
    layout = [
        ("train", "XR_WRIST", "patient00001", "study1_positive", 2),
        ("train", "XR_WRIST", "patient00002", "study1_negative", 1),
        ("train", "XR_FINGER", "patient00003", "study1_negative", 2),
        ("train", "XR_HUMERUS", "patient00003", "study2_positive", 1),
        ("valid", "XR_ELBOW", "patient11185", "study1_positive", 2),
    ]
    for split, region, patient, study, images in layout:
        for i in range(images):
            relative = f"MURA-v1.1/{split}/{region}/{patient}/{study}/image{i + 1}.png"
            write_png(tmp_path / relative, seed)
            rows[split].append(relative)
            seed += 1
    for split, listed in rows.items():
        with (base / f"{split}_image_paths.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([[p] for p in listed])
    return tmp_path


@pytest.fixture
def fracatlas_tree(tmp_path: Path) -> Path:
    """FracAtlas layout: dataset.csv + images/Fractured|Non_fractured."""
    root = tmp_path / "FracAtlas"
    columns = ["image_id", "hand", "leg", "hip", "shoulder", "mixed", "fractured"]
    rows = [
        ["IMG0000001.jpg", 1, 0, 0, 0, 0, 1],
        ["IMG0000002.jpg", 0, 1, 0, 0, 0, 0],
        ["IMG0000003.jpg", 0, 0, 1, 0, 0, 1],
        ["IMG0000004.jpg", 1, 1, 0, 0, 1, 1],  # mixed: no single body part
        ["IMG0000005.jpg", 0, 0, 0, 1, 0, 0],
    ]
    for seed, row in enumerate(rows):
        folder = "Fractured" if row[-1] else "Non_fractured"
        path = root / "images" / folder / str(row[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        assert cv2.imwrite(str(path), rng.integers(0, 255, (40, 40)).astype(np.uint8))
    with (root / "dataset.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return root


@pytest.fixture
def folders_tree(tmp_path: Path) -> Path:
    """Kaggle multi-region style: train|val|test/<fractured|not fractured>/..."""
    root = tmp_path / "bone-fracture"
    seed = 0
    for split in ("train", "val", "test"):
        for klass in ("fractured", "not fractured"):
            for i in range(3):
                write_png(root / split / klass / f"img{i}.png", seed)
                seed += 1
    return root
