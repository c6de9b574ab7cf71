"""The synthetic radiograph generator: determinism, labels, anatomy, fractures, DICOM."""

from __future__ import annotations

import csv
import hashlib
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pydicom
import pytest

from boneflow.cli import main
from boneflow.errors import BoneflowError
from boneflow.findings import BODY_PARTS
from boneflow.training.synth import (
    LABEL_COLUMNS,
    SynthImage,
    SynthSpec,
    fracture_visibility,
    generate_image,
    render,
    synth_command,
    to_display,
)
from boneflow.training.synth_dataset import plan_images
from boneflow.training.synth_fracture import DIFFICULTIES, FRACTURE_TYPES, MIN_VISIBILITY
from boneflow.training.synth_raster import ANATOMY_CLASSES, Bone, Canvas, Lucency, draw_bone

SIZE = 160


def _read_labels(folder: Path) -> list[dict[str, str]]:
    with (folder / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def png_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("png")
    assert synth_command(out, 40, 7, "png", SIZE, 0.5, None) == 0
    return out


@pytest.fixture(scope="module")
def dicom_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dicom")
    assert synth_command(out, 24, 11, "dicom", SIZE, 0.5, None) == 0
    return out


def test_same_seed_gives_identical_images_and_fields() -> None:
    a = generate_image(np.random.default_rng(3), "wrist", True, SIZE)
    b = generate_image(np.random.default_rng(3), "wrist", True, SIZE)
    c = generate_image(np.random.default_rng(4), "wrist", True, SIZE)
    assert np.array_equal(a.pixels, b.pixels)
    assert (a.fracture_segment, a.fracture_type, a.difficulty) == (
        b.fracture_segment,
        b.fracture_type,
        b.difficulty,
    )
    assert not np.array_equal(a.pixels, c.pixels) or a.pixels.shape != c.pixels.shape


def test_same_seed_gives_identical_files(tmp_path: Path, png_set: Path) -> None:
    again = tmp_path / "again"
    assert synth_command(again, 40, 7, "png", SIZE, 0.5, None) == 0
    assert _digest(again) == _digest(png_set)
    other = tmp_path / "other"
    assert synth_command(other, 40, 8, "png", SIZE, 0.5, None) == 0
    assert _digest(other) != _digest(png_set)


@pytest.mark.parametrize("body_part", BODY_PARTS)
def test_every_class_and_fracture_type_is_drawn(body_part: str) -> None:
    rng = np.random.default_rng(BODY_PARTS.index(body_part))
    negative = generate_image(rng, body_part, False, SIZE)
    assert negative.body_part == body_part
    assert (negative.fractured, negative.fracture_type, negative.difficulty) == (False, "", "none")
    assert negative.fracture_segment is None
    for kind, tier in zip(FRACTURE_TYPES, DIFFICULTIES * 2, strict=True):
        image = generate_image(rng, body_part, True, SIZE, fracture_type=kind, difficulty=tier)
        assert (image.fractured, image.fracture_type, image.difficulty) == (True, kind, tier)
        assert image.fracture_segment is not None
        assert image.pixels.dtype == np.uint16 and image.pixels.shape[0] == SIZE
        assert int(image.pixels.max()) <= (1 << image.bits_stored) - 1
        assert image.photometric in ("MONOCHROME1", "MONOCHROME2")
        assert image.laterality in (("",) if body_part == "other" else ("L", "R"))


def test_fracture_segment_lies_on_bone() -> None:
    rng = np.random.default_rng(21)
    checked = 0
    for body_part in BODY_PARTS:
        for kind in FRACTURE_TYPES:
            image, bone = render(rng, body_part, True, 256, fracture_type=kind)
            assert image.fracture_segment is not None
            x0, y0, x1, y1 = image.fracture_segment
            near = cv2.dilate(bone, np.ones((9, 9), np.uint8))  # the gap itself is lucent
            t = np.linspace(0, 1, 15)
            xs = np.clip(np.rint(x0 + t * (x1 - x0)).astype(int), 0, bone.shape[1] - 1)
            ys = np.clip(np.rint(y0 + t * (y1 - y0)).astype(int), 0, bone.shape[0] - 1)
            on_bone = near[ys, xs] > 0.05 * float(bone.max())
            assert on_bone.mean() >= 0.8, (body_part, kind, image.fracture_segment)
            checked += 1
    assert checked == len(BODY_PARTS) * len(FRACTURE_TYPES)


def test_visibility_is_contrast_over_the_clutter_around_the_line() -> None:
    rng = np.random.default_rng(5)
    smooth = np.full((64, 64), 0.5, np.float32)
    textured = smooth + rng.normal(0, 0.05, (64, 64)).astype(np.float32)
    gap = np.zeros((64, 64), np.float32)
    gap[30:33, 16:48] = -0.2  # a lucent line across the bone
    segment = (16.0, 31.0, 47.0, 31.0)
    clear = fracture_visibility(smooth, gap, segment, 1.0)
    masked = fracture_visibility(textured, gap, segment, 1.0)
    faint = fracture_visibility(smooth, gap / 4, segment, 1.0)
    assert clear > 2 * masked > 0  # the same line shows less in trabecular texture
    assert faint == pytest.approx(clear / 4, rel=0.01)  # contrast scales with depth
    assert fracture_visibility(smooth, np.zeros_like(gap), segment, 1.0) == 0.0
    assert fracture_visibility(smooth, gap, (200.0, 200.0, 240.0, 200.0), 1.0) == 0.0


def test_fractures_show_at_least_what_their_tier_promises() -> None:
    """A line that would vanish (dense bone ends, overlaps) is drawn at another site."""
    rng = np.random.default_rng(33)
    seen: dict[str, list[float]] = defaultdict(list)
    for i in range(150):  # at the demo's size; 80-88 % reach the floor at the first site
        tier = DIFFICULTIES[i % 3]
        part = BODY_PARTS[i % 7]
        image = generate_image(rng, part, True, 384, difficulty=tier)
        seen[tier].append(image.visibility)
    for tier, values in seen.items():
        assert np.mean(np.asarray(values) >= MIN_VISIBILITY[tier]) >= 0.95, (tier, values)
    medians = [float(np.median(seen[t])) for t in DIFFICULTIES]
    assert medians[0] > medians[1] > medians[2] > 0, medians  # easy shows most
    assert generate_image(rng, "hand", False, 256).visibility == 0.0


def test_anatomy_names_bone_overlap_and_distractor_lines() -> None:
    canvas = Canvas(64, 64, 1.0)
    texture = np.ones((64, 64), np.float32)
    draw_bone(canvas, Bone("across", 4, 20, 60, 20, 5.0), texture)
    plate = Lucency(u0=30.0, slope=0.0, width_px=1.0, depth=0.8, d_lo=-6.0, d_hi=6.0)
    draw_bone(canvas, Bone("down", 20, 4, 20, 60, 5.0), texture, None, (plate,))
    classes = canvas.anatomy()
    assert ANATOMY_CLASSES == ("background", "bone", "overlap", "distractor")
    assert classes[20, 20] == 2  # where the two bones cross
    assert classes[20, 45] == 1 and classes[50, 20] == 1  # each bone alone
    assert classes[34, 20] == 3  # the lucent line across the second bone (u = 30 px)
    assert classes[34, 40] == 0 and classes[5, 50] == 0  # no bone
    assert not (classes[:, 40:] == 3).any()  # the line stays on its bone


def test_anatomy_of_an_image_covers_its_bones_inside_the_collimator() -> None:
    rng = np.random.default_rng(5)
    spec = SynthSpec(young_rate=1.0)  # growth plates drawn
    seen: set[int] = set()
    for body_part in ("wrist", "shoulder", "forearm", "hand"):
        for _ in range(3):
            image, bone = render(rng, body_part, False, 256, spec=spec)
            classes = image.anatomy
            assert classes is not None and classes.shape == image.pixels.shape
            assert classes.dtype == np.uint8 and int(classes.max()) <= 3
            seen |= set(np.unique(classes).tolist())
            # every labelled pixel lies on drawn bone; most drawn bone is labelled
            assert (bone[classes > 0] > 0).all()
            strong = bone > 0.2 * float(bone.max())
            labelled = classes[strong] > 0
            exposed = _exposed(image)
            assert labelled[exposed[strong]].mean() > 0.9
            assert not classes[~exposed].any()  # nothing outside the collimator
    assert seen == {0, 1, 2, 3}


def _exposed(image: SynthImage) -> npt.NDArray[np.bool_]:
    """Where the collimator blanked nothing: rows and columns that are not constant."""
    pixels = image.pixels.astype(np.float64)
    rows = pixels.std(axis=1) > 0
    cols = pixels.std(axis=0) > 0
    return rows[:, None] & cols[None, :]


def test_monochrome1_is_the_inverse_of_monochrome2() -> None:
    mono1 = generate_image(
        np.random.default_rng(5), "hand", True, SIZE, spec=SynthSpec(monochrome1_rate=1.0)
    )
    mono2 = generate_image(
        np.random.default_rng(5), "hand", True, SIZE, spec=SynthSpec(monochrome1_rate=0.0)
    )
    assert (mono1.photometric, mono2.photometric) == ("MONOCHROME1", "MONOCHROME2")
    top = (1 << mono1.bits_stored) - 1
    diff = mono1.pixels.astype(int) - (top - mono2.pixels.astype(int))
    assert np.abs(diff).max() <= 1
    assert np.allclose(to_display(mono1), to_display(mono2), atol=2.5 / top + 1e-6)


def test_display_shows_bone_bright() -> None:
    rng = np.random.default_rng(9)
    for body_part in ("forearm", "lower_leg", "hand"):
        image, bone = render(rng, body_part, False, 256, spec=SynthSpec(monochrome1_rate=1.0))
        display = to_display(image)
        assert display.dtype == np.float32 and display.min() >= 0.0 and display.max() <= 1.0
        strong = bone > 0.5 * float(bone.max())
        none = (bone == 0) & (cv2.dilate(bone, np.ones((9, 9), np.uint8)) == 0)
        assert display[strong].mean() > display[none].mean() + 0.15, body_part


def test_labels_csv_columns_and_values(png_set: Path) -> None:
    rows = _read_labels(png_set)
    assert len(rows) == 40
    with (png_set / "labels.csv").open() as fh:
        assert fh.readline().strip().split(",") == list(LABEL_COLUMNS)
    for row in rows:
        assert row["body_part"] in BODY_PARTS
        assert row["photometric"] in ("MONOCHROME1", "MONOCHROME2")
        assert row["patient_id"].startswith("SYNTH-")
        pixels = cv2.imread(str(png_set / row["file"]), cv2.IMREAD_UNCHANGED)
        assert pixels.dtype == np.uint16 and pixels.shape[0] == SIZE
        assert int(pixels.max()) < 1 << int(row["bits_stored"])
        coords = [row[f"fracture_{k}"] for k in ("x0", "y0", "x1", "y1")]
        if row["fractured"] == "1":
            assert row["fracture_type"] in FRACTURE_TYPES
            assert row["difficulty"] in DIFFICULTIES
            assert all(0 <= float(v) <= max(pixels.shape) for v in coords)
        else:
            assert row["fractured"] == "0"
            assert (row["fracture_type"], row["difficulty"], *coords) == (
                "",
                "none",
                "",
                "",
                "",
                "",
            )
    assert {r["fractured"] for r in rows} == {"0", "1"}


def test_patients_have_studies_of_one_body_part_and_side() -> None:
    plan = plan_images(5, 600, 0.5, BODY_PARTS)
    studies: dict[tuple[int, int], list[object]] = defaultdict(list)
    per_patient: dict[int, set[int]] = defaultdict(set)
    for item in plan:
        studies[(item.patient_number, item.study_number)].append(item)
        per_patient[item.patient_number].add(item.study_number)
    assert all(1 <= len(s) <= 3 for s in per_patient.values())
    assert max(len(s) for s in per_patient.values()) > 1
    for items in studies.values():
        assert 1 <= len(items) <= 4
        assert len({(i.body_part, i.laterality, i.fractured) for i in items}) == 1  # type: ignore[attr-defined]
    assert not any(i.fractured for i in plan if i.body_part == "other")
    rate = np.mean([i.fractured for i in plan if i.body_part != "other"])
    assert 0.35 < rate < 0.65


def test_dicom_output_is_readable_and_consistent(dicom_set: Path) -> None:
    rows = _read_labels(dicom_set)
    modalities = set()
    for row in rows:
        ds = pydicom.dcmread(dicom_set / row["file"])
        modalities.add(ds.Modality)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == (
            "1.2.840.10008.5.1.4.1.1.1" if ds.Modality == "CR" else "1.2.840.10008.5.1.4.1.1.1.1"
        )
        assert str(ds.PatientName).startswith("SYNTH^")
        assert ds.PatientID == row["patient_id"]
        assert ds.StudyInstanceUID == row["study_instance_uid"]
        assert ds.PhotometricInterpretation == row["photometric"]
        assert ds.BitsStored == int(row["bits_stored"]) and ds.HighBit == ds.BitsStored - 1
        assert ds.PixelRepresentation == 0
        assert int(ds.pixel_array.max()) < 1 << ds.BitsStored
        assert ds.Rows == SIZE
    uids = [pydicom.dcmread(dicom_set / r["file"]).SOPInstanceUID for r in rows]
    assert len(set(uids)) == len(uids)
    assert modalities == {"CR", "DX"}


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_dicom_output_passes_dciodvfy(dicom_set: Path) -> None:
    files = sorted(dicom_set.rglob("*.dcm"))
    assert len(files) == 24
    for path in files:
        result = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, check=False
        )
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
        assert not errors, (path.name, errors)


def test_same_seed_gives_identical_dicom(tmp_path: Path, dicom_set: Path) -> None:
    assert synth_command(tmp_path, 24, 11, "dicom", SIZE, 0.5, None) == 0
    assert _digest(tmp_path) == _digest(dicom_set)


def test_router_classes_are_learnable_by_a_linear_model() -> None:
    from sklearn.linear_model import LogisticRegression

    features, labels = [], []
    for i in range(240):
        rng = np.random.default_rng([99, i])
        part = BODY_PARTS[i % len(BODY_PARTS)]
        image = generate_image(rng, part, bool(i % 3 == 0), 128)
        display = to_display(image)
        square = np.zeros((128, 128), np.float32)
        square[:, : display.shape[1]] = display
        features.append(cv2.resize(square, (24, 24), interpolation=cv2.INTER_AREA).ravel())
        labels.append(i % len(BODY_PARTS))
    x, y = np.asarray(features), np.asarray(labels)
    model = LogisticRegression(max_iter=500, C=0.1).fit(x[:160], y[:160])
    accuracy = float((model.predict(x[160:]) == y[160:]).mean())
    assert accuracy > 0.4  # chance is 0.125


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(BoneflowError, match="--count"):
        synth_command(tmp_path, 0, 0, "png", SIZE, 0.5, None)
    with pytest.raises(BoneflowError, match="unknown body part"):
        synth_command(tmp_path, 3, 0, "png", SIZE, 0.5, ["hand", "knee"])
    with pytest.raises(BoneflowError, match="--fracture-rate"):
        synth_command(tmp_path, 3, 0, "png", SIZE, 1.5, None)
    with pytest.raises(ValueError, match="unknown fracture type"):
        generate_image(np.random.default_rng(0), "hand", True, SIZE, fracture_type="greenstick")
    assert not (tmp_path / "labels.csv").exists()


def test_cli_writes_a_data_set(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["synth", "--out", str(out), "--count", "5", "--seed", "2", "--size", "96"]
    assert main([*args, "--parts", "hand,elbow", "--fracture-rate", "1"]) == 0
    rows = _read_labels(out)
    assert {r["body_part"] for r in rows} <= {"hand", "elbow"}
    assert all(r["fractured"] == "1" for r in rows)


def test_dicom_read_back_by_the_pixel_pipeline_matches_to_display(dicom_set: Path) -> None:
    from boneflow.dicom.pixels import read_pixels
    from boneflow.training.synth import SynthImage

    for row in _read_labels(dicom_set)[:8]:
        ds = pydicom.dcmread(dicom_set / row["file"])
        pixels = read_pixels(ds)
        pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min())
        stored = SynthImage(
            ds.pixel_array.astype(np.uint16),
            ds.BitsStored,
            ds.PhotometricInterpretation,
            row["body_part"],
            False,
            "",
            "none",
            None,
            "",
            "",
        )
        assert np.abs(pixels - to_display(stored)).max() < 0.02, row["file"]
