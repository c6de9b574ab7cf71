"""Data set adapters: MURA, FracAtlas, folder-per-class, DICOM + CSV and boneflow synth.

Every adapter returns :class:`Record` values (one per image) so that training and evaluation
never care where the data came from. :func:`prepare_dataset` then drops corrupt files and
exact duplicates (by content hash) and assigns patient-level splits, reporting each step in
a :class:`DataReport`.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from boneflow.errors import BoneflowError
from boneflow.findings import BODY_PARTS

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom", ""})

# MURA study type folders -> boneflow body parts (fingers are read by the hand model).
MURA_PARTS: dict[str, str] = {
    "XR_HAND": "hand",
    "XR_FINGER": "hand",
    "XR_WRIST": "wrist",
    "XR_FOREARM": "forearm",
    "XR_ELBOW": "elbow",
    "XR_HUMERUS": "humerus",
    "XR_SHOULDER": "shoulder",
}
# FracAtlas region columns -> boneflow body parts (hips have no fracture model: "other").
FRACATLAS_PARTS: dict[str, str] = {
    "hand": "hand",
    "leg": "lower_leg",
    "hip": "other",
    "shoulder": "shoulder",
}
# Folder names a user may give classes, beyond the body part names themselves.
_PART_ALIASES: dict[str, str] = {
    "finger": "hand",
    "fingers": "hand",
    "hands": "hand",
    "wrists": "wrist",
    "forearms": "forearm",
    "elbows": "elbow",
    "humerus": "humerus",
    "shoulders": "shoulder",
    "leg": "lower_leg",
    "legs": "lower_leg",
    "lowerleg": "lower_leg",
    "tibia": "lower_leg",
    "chest": "other",
    "pelvis": "other",
    "hip": "other",
    "hips": "other",
    "skull": "other",
}
_FRACTURED = {"fractured", "fracture", "positive", "abnormal", "1", "true", "yes"}
_NOT_FRACTURED = {
    "notfractured",
    "nonfractured",
    "nofracture",
    "negative",
    "normal",
    "0",
    "false",
    "no",
}


class DatasetError(BoneflowError):
    """A data set is missing, malformed or empty; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class Record:
    """One image of a data set, whatever its source.

    ``body_part`` is one of :data:`~boneflow.findings.BODY_PARTS` or ``None`` when the source
    does not say; ``fractured`` is ``None`` when unknown. ``split`` is preset when the
    source defines it (MURA valid, a ``test`` folder) and otherwise assigned by
    :func:`split_by_patient`. ``photometric`` says how to read the stored values
    (``MONOCHROME1``: bone dark, inverted on reading).
    """

    path: Path
    body_part: str | None
    fractured: bool | None
    patient_id: str
    study_id: str
    split: str | None = None
    difficulty: str | None = None
    fracture_type: str | None = None
    photometric: str = "MONOCHROME2"
    bits_stored: int | None = None
    fracture_segment: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 px


@dataclass(frozen=True, slots=True)
class DataReport:
    """What :func:`prepare_dataset` found and did, for the training report."""

    source: str
    found: int
    corrupt: tuple[tuple[str, str], ...]  # (path, reason)
    duplicates: tuple[tuple[str, str], ...]  # (dropped path, kept path)
    label_conflicts: tuple[tuple[str, str], ...]  # duplicates whose labels disagree
    split_counts: dict[str, int] = field(default_factory=dict)
    patients: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary (lists are capped at 100 entries each)."""
        return {
            "source": self.source,
            "found": self.found,
            "corrupt_count": len(self.corrupt),
            "corrupt": [list(item) for item in self.corrupt[:100]],
            "duplicate_count": len(self.duplicates),
            "duplicates": [list(item) for item in self.duplicates[:100]],
            "label_conflict_count": len(self.label_conflicts),
            "label_conflicts": [list(item) for item in self.label_conflicts[:100]],
            "split_counts": dict(self.split_counts),
            "patients": dict(self.patients),
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True, slots=True)
class PreparedDataset:
    """Clean records with their splits assigned, and the report of how they were made."""

    records: tuple[Record, ...]
    report: DataReport

    def split(self, name: str) -> list[Record]:
        """The records of one split."""
        return [r for r in self.records if r.split == name]


# ---- public API -------------------------------------------------------------------------


def load_records(dataset_format: str, root: Path) -> list[Record]:
    """Read a data set of the given format into records.

    Args:
        dataset_format: ``synth``, ``mura``, ``fracatlas``, ``folders`` or ``dicom-csv``.
        root: the data set folder (for ``synth`` and ``dicom-csv`` also its labels CSV).

    Raises:
        DatasetError: unknown format, missing files or no usable image.
    """
    loaders: dict[str, Callable[[Path], list[Record]]] = {
        "synth": load_synth,
        "mura": load_mura,
        "fracatlas": load_fracatlas,
        "folders": load_folders,
        "dicom-csv": load_dicom_csv,
    }
    if dataset_format not in loaders:
        raise DatasetError(f"unknown data set format {dataset_format!r} ({', '.join(loaders)})")
    if not root.exists():
        raise DatasetError(f"{root} does not exist")
    records = loaders[dataset_format](root)
    if not records:
        raise DatasetError(f"no images found in {root} (format {dataset_format})")
    log.info("read %d records from %s (%s)", len(records), root, dataset_format)
    return records


def prepare_dataset(
    records: Sequence[Record],
    source: str,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    check_images: bool = True,
    progress: Callable[[Iterable[Record], int], Iterable[Record]] | None = None,
) -> PreparedDataset:
    """Drop corrupt files and duplicates, then split by patient.

    Args:
        records: from :func:`load_records`.
        source: a short name of where they came from, for the report.
        seed: changes which patients land in which split.
        fractions: train/val/test shares of the records without a preset split.
        check_images: decode every image to find corrupt ones (slow on big sets).
        progress: wraps the iteration over records (a progress bar), given the total.
    """
    iterate = progress or (lambda items, _total: items)
    corrupt: list[tuple[str, str]] = []
    hashed: list[tuple[Record, str]] = []
    for record in iterate(records, len(records)):
        try:
            digest = file_sha256(record.path)
            if check_images:
                read_image(record)
        except (OSError, DatasetError) as exc:
            corrupt.append((str(record.path), str(exc)))
            log.warning("corrupt image %s: %s", record.path, exc)
            continue
        hashed.append((record, digest))
    kept, duplicates, conflicts = drop_duplicates(hashed)
    split = split_by_patient([r for r, _ in kept], seed=seed, fractions=fractions)
    digests = sorted(d for _, d in kept)
    fingerprint = hashlib.sha256("\n".join(digests).encode()).hexdigest()
    report = DataReport(
        source=source,
        found=len(records),
        corrupt=tuple(corrupt),
        duplicates=tuple(duplicates),
        label_conflicts=tuple(conflicts),
        split_counts=dict(Counter(r.split or "none" for r in split)),
        patients={name: len({r.patient_id for r in split if r.split == name}) for name in SPLITS},
        fingerprint=fingerprint,
    )
    if corrupt or duplicates:
        log.warning(
            "%s: %d corrupt and %d duplicate images dropped", source, len(corrupt), len(duplicates)
        )
    return PreparedDataset(records=tuple(split), report=report)


def drop_duplicates(
    hashed: Sequence[tuple[Record, str]],
) -> tuple[list[tuple[Record, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """Keep the first record of each content hash.

    Returns:
        The kept (record, hash) pairs, the dropped (path, kept path) pairs, and the subset of
        those whose labels (body part or fracture) disagree with the kept copy.
    """
    first: dict[str, Record] = {}
    kept: list[tuple[Record, str]] = []
    duplicates: list[tuple[str, str]] = []
    conflicts: list[tuple[str, str]] = []
    for record, digest in hashed:
        original = first.get(digest)
        if original is None:
            first[digest] = record
            kept.append((record, digest))
            continue
        duplicates.append((str(record.path), str(original.path)))
        if (record.body_part, record.fractured) != (original.body_part, original.fractured):
            conflicts.append((str(record.path), str(original.path)))
    return kept, duplicates, conflicts


def split_by_patient(
    records: Sequence[Record],
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> list[Record]:
    """Assign train/val/test so that no patient is in two splits.

    Records with a preset split keep it, and every other record of the same patient joins
    that split (the first preset seen wins). The remaining patients are ordered by a seeded
    hash and dealt out to reach the wanted share of images in each split; a split that the
    source already defines (MURA's valid set is boneflow's test) gets no further patients.
    """
    preset: dict[str, str] = {}
    for record in records:
        if record.split is not None:
            preset.setdefault(record.patient_id, record.split)
    free: dict[str, int] = Counter(r.patient_id for r in records if r.patient_id not in preset)
    # a split the source already defines (MURA valid = test) takes no free patients
    shares = [
        0.0 if name in preset.values() else f for name, f in zip(SPLITS, fractions, strict=True)
    ]
    if sum(shares) <= 0:
        shares = [1.0, 0.0, 0.0]
    assignment = dict(preset)
    assignment.update(_deal(free, shares, seed))
    train = [r for r in records if assignment[r.patient_id] == "train"]
    if "val" not in assignment.values() and len({r.patient_id for r in train}) >= 2:
        # no validation split (e.g. train/ and test/ folders only): carve one from train
        patients = Counter(r.patient_id for r in train)
        assignment.update(_deal(patients, [0.85, 0.15, 0.0], seed))
    return [replace(r, split=assignment[r.patient_id]) for r in records]


def read_image(record: Record) -> npt.NDArray[np.float32]:
    """The record's image as float32 in 0..1 with bone bright.

    Raises:
        DatasetError: the file cannot be decoded.
    """
    if record.path.suffix.lower() in IMAGE_SUFFIXES:
        return _read_picture(record)
    return _read_dicom(record.path)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- adapters ---------------------------------------------------------------------------


def load_mura(root: Path) -> list[Record]:
    """MURA v1.1: ``train_image_paths.csv``/``valid_image_paths.csv`` and the folder layout.

    ``root`` is the ``MURA-v1.1`` folder or its parent. Labels come from the study folder
    (``study1_positive``); MURA's ``valid`` split becomes boneflow's test split, and its
    ``train`` split is divided into train and val by patient.
    """
    base = root / "MURA-v1.1" if (root / "MURA-v1.1").is_dir() else root
    records: list[Record] = []
    for csv_name, split in (("train_image_paths.csv", None), ("valid_image_paths.csv", "test")):
        listing = base / csv_name
        if not listing.is_file():
            continue
        with listing.open(newline="") as handle:
            for row in csv.reader(handle):
                if row and row[0].strip():
                    record = _mura_record(base, row[0].strip(), split)
                    if record is not None:
                        records.append(record)
    if not records:
        raise DatasetError(f"{base}: no train_image_paths.csv or valid_image_paths.csv")
    return records


def load_fracatlas(root: Path) -> list[Record]:
    """FracAtlas: ``dataset.csv`` and ``images/Fractured|Non_fractured/<image_id>``.

    Images tagged with several regions (``mixed``) or none get ``body_part=None``: they
    train the fracture model but not the router. FracAtlas has no patient identifiers, so
    each image counts as its own patient (a known limitation of that data set).
    """
    listing = root / "dataset.csv"
    if not listing.is_file():
        raise DatasetError(f"{root}: dataset.csv not found")
    records: list[Record] = []
    with listing.open(newline="") as handle:
        for row in csv.DictReader(handle):
            image_id = (row.get("image_id") or "").strip()
            if not image_id:
                continue
            fractured = _truthy(row.get("fractured", "0"))
            folder = "Fractured" if fractured else "Non_fractured"
            path = root / "images" / folder / image_id
            if not path.exists():
                found = list((root / "images").rglob(image_id))
                if not found:
                    log.warning("FracAtlas image %s listed but missing", image_id)
                    continue
                path = found[0]
            parts = [p for col, p in FRACATLAS_PARTS.items() if _truthy(row.get(col, "0"))]
            body_part = parts[0] if len(set(parts)) == 1 else None
            stem = Path(image_id).stem
            records.append(Record(path, body_part, fractured, stem, stem))
    return records


def load_folders(root: Path) -> list[Record]:
    """A folder per class: ``<root>/<train|val|test>/<class>/...`` (or ``<root>/<class>``).

    A class named like a body part (``wrist``, ``lower_leg``, ``chest`` ...) labels the body
    part; one named ``fractured``/``not fractured`` (or positive/negative) labels the
    fracture; ``<part>_fractured`` style names label both. Without patient identifiers
    every image is its own patient unless its name starts with ``<patient>__``.
    """
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    bases: list[tuple[Path, str | None]] = [(d, d.name) for d in split_dirs] or [(root, None)]
    records: list[Record] = []
    for base, split in bases:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            body_part, fractured = parse_class_name(class_dir.name)
            if body_part is None and fractured is None:
                log.warning("folder %s is not a body part or fracture class; skipped", class_dir)
                continue
            for path in sorted(class_dir.rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES | {".dcm"}:
                    patient = path.stem.split("__")[0] if "__" in path.stem else path.stem
                    patient = f"{split or 'all'}/{class_dir.name}/{patient}"
                    records.append(Record(path, body_part, fractured, patient, patient, split))
    return records


def load_dicom_csv(root: Path) -> list[Record]:
    """A folder of DICOM files with a labels CSV.

    The CSV (``root`` itself, or ``labels.csv`` in ``root``) has ``file`` (relative to the
    CSV) and at least one of ``body_part`` / ``fractured``; ``patient_id``,
    ``study_instance_uid`` and ``split`` are optional and otherwise read from the header.
    """
    listing = root if root.is_file() else root / "labels.csv"
    if not listing.is_file():
        raise DatasetError(f"{root}: labels.csv not found")
    records: list[Record] = []
    for row in _csv_rows(listing, required=("file",)):
        path = listing.parent / row["file"]
        body_part = _body_part(row.get("body_part", ""), listing)
        fractured = _optional_bool(row.get("fractured", ""), listing)
        patient, study = row.get("patient_id", ""), row.get("study_instance_uid", "")
        if not patient or not study:
            patient, study = _dicom_ids(path, patient, study)
        split = row.get("split") or None
        if split is not None and split not in SPLITS:
            raise DatasetError(f"{listing}: split {split!r} is not one of {', '.join(SPLITS)}")
        records.append(Record(path, body_part, fractured, patient, study, split))
    return records


def load_synth(root: Path) -> list[Record]:
    """boneflow synth output: PNG or DICOM files beside ``labels.csv``."""
    listing = root if root.is_file() else root / "labels.csv"
    if not listing.is_file():
        raise DatasetError(f"{root}: labels.csv not found (write one with boneflow synth)")
    records: list[Record] = []
    for row in _csv_rows(listing, required=("file", "body_part", "fractured", "patient_id")):
        bits = row.get("bits_stored", "")
        records.append(
            Record(
                path=listing.parent / row["file"],
                body_part=_body_part(row["body_part"], listing),
                fractured=_optional_bool(row["fractured"], listing),
                patient_id=row["patient_id"],
                study_id=row.get("study_instance_uid") or row["patient_id"],
                split=row.get("split") or None,
                difficulty=row.get("difficulty") or None,
                fracture_type=row.get("fracture_type") or None,
                photometric=row.get("photometric") or "MONOCHROME2",
                bits_stored=int(bits) if bits.isdigit() else None,
                fracture_segment=_segment(row, listing),
            )
        )
    return records


def _segment(row: Mapping[str, str], listing: Path) -> tuple[float, float, float, float] | None:
    """The fracture line of a synth labels row (``fracture_x0`` ... ``fracture_y1``), if any."""
    values = [row.get(f"fracture_{axis}{end}", "").strip() for end in "01" for axis in "xy"]
    if not any(values):
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in values)
    except ValueError:
        raise DatasetError(
            f"{listing}: {row.get('file')}: bad fracture location {values}"
        ) from None
    return (x0, y0, x1, y1)


def parse_class_name(name: str) -> tuple[str | None, bool | None]:
    """Body part and fracture label named by a class folder (either may be ``None``)."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    joined = "".join(words)
    if joined in _FRACTURED:
        return None, True
    if joined in _NOT_FRACTURED:
        return None, False
    fractured: bool | None = None
    for size in (2, 1):  # "not fractured" before "fractured"
        for i in range(len(words) - size + 1):
            chunk = "".join(words[i : i + size])
            if fractured is None and chunk in _NOT_FRACTURED:
                fractured = False
            elif fractured is None and chunk in _FRACTURED:
                fractured = True
    body_part = None
    for size in (2, 1):
        for i in range(len(words) - size + 1):
            chunk = "_".join(words[i : i + size])
            found = chunk if chunk in BODY_PARTS else _PART_ALIASES.get(chunk.replace("_", ""))
            if found and body_part is None:
                body_part = found
    return body_part, fractured


# ---- helpers ----------------------------------------------------------------------------


def _mura_record(base: Path, listed: str, split: str | None) -> Record | None:
    parts = Path(listed).parts
    try:
        anchor = next(i for i, p in enumerate(parts) if p.startswith("XR_"))
    except StopIteration:
        log.warning("MURA path without XR_ folder skipped: %s", listed)
        return None
    region, patient, study = parts[anchor], parts[anchor + 1], parts[anchor + 2]
    body_part = MURA_PARTS.get(region)
    if body_part is None:
        log.warning("MURA region %s has no boneflow body part; skipped", region)
        return None
    # paths in the CSV start with MURA-v1.1/; resolve them against the folder holding it
    relative = Path(*parts[parts.index("MURA-v1.1") + 1 :]) if "MURA-v1.1" in parts else None
    path = base / relative if relative is not None else base / listed
    fractured = study.endswith("_positive")
    return Record(path, body_part, fractured, patient, f"{patient}/{region}/{study}", split)


def _read_picture(record: Record) -> npt.NDArray[np.float32]:
    raw = cv2.imread(str(record.path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.size == 0:
        raise DatasetError(f"{record.path}: not a readable image")
    if raw.ndim == 3:
        raw = cv2.cvtColor(raw[..., :3], cv2.COLOR_BGR2GRAY)
    if raw.dtype == np.uint8:
        scale = 255.0
    elif raw.dtype == np.uint16:
        scale = float(2 ** (record.bits_stored or 16) - 1)
    else:
        scale = float(max(raw.max(), 1))
    image = np.clip(raw.astype(np.float32) / np.float32(scale), 0.0, 1.0)
    if record.photometric.upper() == "MONOCHROME1":
        image = 1.0 - image
    return np.asarray(image, dtype=np.float32)


def _read_dicom(path: Path) -> npt.NDArray[np.float32]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    from boneflow.dicom.pixels import read_pixels
    from boneflow.errors import UnreadableInstance

    try:
        ds = pydicom.dcmread(path)
        image = read_pixels(ds)
    except (InvalidDicomError, UnreadableInstance, OSError, ValueError, AttributeError) as exc:
        raise DatasetError(f"{path}: {exc}") from exc
    low, high = float(image.min()), float(image.max())
    return np.asarray((image - low) / max(high - low, 1e-6), dtype=np.float32)


def _dicom_ids(path: Path, patient: str, study: str) -> tuple[str, str]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable file is reported later as corrupt
        log.warning("cannot read identifiers of %s: %s", path, exc)
        return patient or str(path), study or str(path)
    return (
        patient or str(ds.get("PatientID", "") or path),
        study or str(ds.get("StudyInstanceUID", "") or path),
    )


def _csv_rows(listing: Path, required: Sequence[str]) -> list[dict[str, str]]:
    with listing.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        missing = [c for c in required if c not in columns]
        if missing:
            raise DatasetError(f"{listing}: missing column(s) {', '.join(missing)}")
        return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]


def _body_part(text: str, listing: Path) -> str | None:
    if not text:
        return None
    if text in BODY_PARTS:
        return text
    part, _ = parse_class_name(text)
    if part is None:
        raise DatasetError(f"{listing}: body part {text!r} is not one of {', '.join(BODY_PARTS)}")
    return part


def _optional_bool(text: str, listing: Path) -> bool | None:
    if not text:
        return None
    key = re.sub(r"[^a-z0-9]", "", text.lower())
    if key in _FRACTURED:
        return True
    if key in _NOT_FRACTURED:
        return False
    raise DatasetError(f"{listing}: fractured value {text!r} is not 0/1 or true/false")


def _truthy(text: str | None) -> bool:
    return (text or "").strip().lower() in {"1", "true", "yes", "1.0"}


def _deal(
    images_per_patient: Mapping[str, int], shares: Sequence[float], seed: int
) -> dict[str, str]:
    """Deal patients (in seeded-hash order) to the split furthest below its image target.

    When there are enough patients, every split with a share gets at least one.
    """
    order = sorted(images_per_patient, key=lambda p: _seeded_hash(seed, p))
    total = sum(shares)
    targets = [share / total * sum(images_per_patient.values()) for share in shares]
    counts = [0.0] * len(shares)
    wanted = [i for i in range(len(shares)) if shares[i] > 0]
    assignment: dict[str, str] = {}
    for n, patient in enumerate(order):
        if len(order) >= len(wanted) and n < len(wanted):
            index = wanted[-1 - n]  # smallest splits first: val and test are never empty
        else:
            gaps = [targets[i] - counts[i] if shares[i] > 0 else -1e18 for i in range(len(shares))]
            index = int(np.argmax(gaps))
        assignment[patient] = SPLITS[index]
        counts[index] += images_per_patient[patient]
    return assignment


def _seeded_hash(seed: int, patient: str) -> str:
    return hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()


def group_counts(records: Iterable[Record]) -> dict[str, dict[str, int]]:
    """Images per split and body part (for the report)."""
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for r in records:
        key = r.body_part or "unknown"
        counts[r.split or "none"][key] = counts[r.split or "none"].get(key, 0) + 1
    return dict(counts)
