"""Options of ``boneflow train`` and ``boneflow evaluate`` (light: no torch import here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class TrainOptions:
    """What to train, on what data, and how.

    ``dataset_format`` is one of ``synth`` (boneflow's own PNG/DICOM + labels.csv),
    ``mura``, ``fracatlas``, ``folders`` (train|val|test/<class>/...) or ``dicom-csv``.
    ``task`` is ``router``, ``fracture`` or ``all``.
    """

    data: Path | None = None
    dataset_format: str = "synth"
    task: str = "all"
    architecture: str | None = None  # None = the measured default for the task
    epochs: int | None = None
    batch_size: int = 32
    image_size: int = 224
    learning_rate: float | None = None
    optimizer: str = "sgd"  # sgd (momentum 0.9, weight decay 1e-4) or adamw
    loss: str = "focal"  # focal or weighted-ce
    seed: int = 0
    report_dir: Path | None = None
    resume: bool = False
    demo: bool = False
    version: str | None = None
    max_minutes: float | None = None
    workers: int = 0
    crop_size: int = 0  # > 0: fracture model on crops around known fracture lines (synth)
    localisation_weight: float | None = None  # None: 1.0 when the data locate fractures
    mirror: bool = False  # fracture model scores each image with its mirror image (fracnet)
    tile: int = 0  # > 0: fracture model scores images in tiles of this many px (fracnet)
    tile_margin: int = 64  # context each scored cell keeps inside its tile, px
    rotation: float = 0.0  # > 0: fracture model also scores each image turned by +/- this (deg)


@dataclass(frozen=True, slots=True)
class EvaluateOptions:
    """Which registered model to evaluate on which data."""

    model: str
    version: str | None = None
    data: Path | None = None
    dataset_format: str = "synth"
    split: str = "test"
    report_dir: Path | None = None
    batch_size: int = 32
