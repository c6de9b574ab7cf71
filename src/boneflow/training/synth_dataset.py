"""Writing a synthetic data set: patients, studies, images (PNG or DICOM) and labels.csv.

Image ``i`` is drawn from its own generator seeded by ``(seed, i)``, and the patient and
study plan from one seeded by ``seed``, so the same seed gives the same bytes.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom.uid import generate_uid
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from boneflow.errors import BoneflowError
from boneflow.findings import BODY_PARTS
from boneflow.training.synth import LABEL_COLUMNS, VIEWS, SynthImage, SynthSpec, generate_image
from boneflow.training.synth_dicom import DicomContext, write_dicom

log = logging.getLogger(__name__)

_YOUNG = SynthSpec(young_rate=1.0)
_ADULT = SynthSpec(young_rate=0.0)
_FIRST_NAMES = ("ALEX", "SAM", "ROBIN", "KIM", "JO", "NOA", "ARI", "MIKA", "LEE", "RIO")


@dataclass(frozen=True, slots=True)
class PlannedImage:
    """One image of the plan: who, which study, what to draw."""

    index: int
    patient_number: int
    study_number: int
    image_number: int
    body_part: str
    fractured: bool
    laterality: str
    view: str
    modality: str
    young: bool


def write_dataset(
    out_dir: Path,
    count: int,
    seed: int,
    fmt: str,
    size: int,
    fracture_rate: float,
    parts: list[str] | None,
) -> int:
    """Write the data set (see :func:`boneflow.training.synth.synth_command`)."""
    chosen = _validate(count, fmt, size, fracture_rate, parts)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_images(seed, count, fracture_rate, chosen)
    rows: list[dict[str, str]] = []
    started = time.monotonic()
    console = Console(stderr=True)
    columns = (
        TextColumn("synth"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("synth", total=len(plan))
        for item in plan:
            rows.append(_write_one(out_dir, item, seed, fmt, size))
            progress.advance(task)
    _write_labels(out_dir / "labels.csv", rows)
    elapsed = time.monotonic() - started
    log.info("wrote %d %s images to %s in %.1f s", len(rows), fmt, out_dir, elapsed)
    return 0


def plan_images(
    seed: int, count: int, fracture_rate: float, parts: tuple[str, ...]
) -> list[PlannedImage]:
    """Patients with 1-3 studies, studies with 1-4 images of one body part and side."""
    rng = np.random.default_rng([seed, 0x5EED])
    plan: list[PlannedImage] = []
    patient = 0
    while len(plan) < count:
        patient += 1
        young = bool(rng.random() < 0.3)
        for study in range(1, int(rng.integers(1, 4)) + 1):
            part = parts[int(rng.integers(len(parts)))]
            fractured = part != "other" and bool(rng.random() < fracture_rate)
            side = "" if part == "other" else ("L" if rng.random() < 0.5 else "R")
            modality = "DX" if rng.random() < 0.3 else "CR"
            views = VIEWS[part]
            for image in range(1, int(rng.integers(1, 5)) + 1):
                if len(plan) == count:
                    break
                view = views[(image - 1) % len(views)]
                plan.append(
                    PlannedImage(
                        len(plan),
                        patient,
                        study,
                        image,
                        part,
                        fractured,
                        side,
                        view,
                        modality,
                        young,
                    )
                )
    return plan


def _validate(
    count: int, fmt: str, size: int, fracture_rate: float, parts: list[str] | None
) -> tuple[str, ...]:
    if count < 1:
        raise BoneflowError(f"synth: --count must be at least 1, not {count}")
    if fmt not in ("png", "dicom"):
        raise BoneflowError(f"synth: --format must be png or dicom, not {fmt!r}")
    if not 64 <= size <= 4096:
        raise BoneflowError(f"synth: --size must be between 64 and 4096, not {size}")
    if not 0.0 <= fracture_rate <= 1.0:
        raise BoneflowError(f"synth: --fracture-rate must be between 0 and 1, not {fracture_rate}")
    chosen = tuple(parts) if parts else BODY_PARTS
    unknown = [p for p in chosen if p not in BODY_PARTS]
    if unknown:
        raise BoneflowError(
            f"synth: unknown body part(s) {', '.join(unknown)} (known: {', '.join(BODY_PARTS)})"
        )
    return chosen


def _uid(seed: int, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["boneflow-synth", str(seed), *map(str, parts)]))


def _write_one(out_dir: Path, item: PlannedImage, seed: int, fmt: str, size: int) -> dict[str, str]:
    rng = np.random.default_rng([seed, item.index])
    spec = _YOUNG if item.young else _ADULT
    image = generate_image(
        rng,
        item.body_part,
        item.fractured,
        size,
        spec=spec,
        laterality=item.laterality,
        view=item.view,
    )
    patient_id = f"SYNTH-{seed}-{item.patient_number:06d}"
    study_uid = _uid(seed, patient_id, "study", item.study_number)
    folder = out_dir / patient_id
    folder.mkdir(exist_ok=True)
    stem = f"s{item.study_number}_i{item.image_number}"
    if fmt == "png":
        path = folder / f"{stem}.png"
        if not cv2.imwrite(str(path), image.pixels):
            raise BoneflowError(f"synth: could not write {path}")
    else:
        path = folder / f"{stem}.dcm"
        write_dicom(path, image, _context(rng, item, seed, patient_id, study_uid, image))
    return _label_row(path.relative_to(out_dir).as_posix(), image, patient_id, study_uid)


def _context(
    rng: np.random.Generator,
    item: PlannedImage,
    seed: int,
    patient_id: str,
    study_uid: str,
    image: SynthImage,
) -> DicomContext:
    plan_rng = np.random.default_rng([seed, item.patient_number, 0xDA7E])
    birth_year = int(plan_rng.integers(2010, 2020) if item.young else plan_rng.integers(1940, 2004))
    day = int(plan_rng.integers(0, 365 * 5)) + item.study_number * 17
    study_date = np.datetime64("2021-01-01") + np.timedelta64(day, "D")
    minutes = int(plan_rng.integers(7 * 60, 19 * 60)) + item.study_number
    name = _FIRST_NAMES[int(plan_rng.integers(len(_FIRST_NAMES)))]
    return DicomContext(
        patient_id=patient_id,
        patient_name=f"SYNTH^{name}{item.patient_number}",
        patient_birth_date=f"{birth_year}0101",
        patient_sex=str(plan_rng.choice(["F", "M", "O"])),
        study_instance_uid=study_uid,
        series_instance_uid=_uid(seed, patient_id, "series", item.study_number, item.modality),
        sop_instance_uid=_uid(seed, patient_id, "sop", item.study_number, item.image_number),
        study_date=str(study_date).replace("-", ""),
        study_time=f"{minutes // 60:02d}{minutes % 60:02d}00",
        accession_number=f"SY{seed % 1000:03d}{item.patient_number:06d}{item.study_number}",
        series_number=1,
        instance_number=item.image_number,
        modality=item.modality,
        pixel_spacing_mm=round(float(rng.uniform(0.1, 0.2)) * 2048 / max(image.pixels.shape), 4),
        body_part_present=bool(rng.random() < 0.85),
    )


def _label_row(file: str, image: SynthImage, patient_id: str, study_uid: str) -> dict[str, str]:
    seg = image.fracture_segment
    coords = [f"{v:.1f}" for v in seg] if seg else ["", "", "", ""]
    values = [
        file,
        image.body_part,
        "1" if image.fractured else "0",
        image.fracture_type,
        image.difficulty,
        patient_id,
        study_uid,
        image.laterality,
        image.view,
        *coords,
        image.photometric,
        str(image.bits_stored),
    ]
    return dict(zip(LABEL_COLUMNS, values, strict=True))


def _write_labels(path: Path, rows: list[dict[str, str]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(LABEL_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
