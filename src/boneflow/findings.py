"""Values that cross subpackages: what the analysis found for one image.

``models`` produces :class:`Finding`; ``dicom`` turns findings into SR and SC objects;
``worker`` records them in the audit log. Keep this module free of heavy imports.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

# The body parts the router knows. "other" covers everything without a fracture model
# (chest, pelvis, skull ...): boneflow lists such images as not analysed.
BODY_PARTS: tuple[str, ...] = (
    "hand",
    "wrist",
    "forearm",
    "elbow",
    "humerus",
    "shoulder",
    "lower_leg",
    "other",
)


class FindingStatus(enum.StrEnum):
    """Whether the fracture stage ran for an image."""

    ANALYSED = "analysed"
    NOT_ANALYSED = "not_analysed"


@dataclass(frozen=True, slots=True)
class ModelId:
    """A registered model: name and version, written into every SR and SC."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True, slots=True)
class BoundingBox:
    """A box in source pixel coordinates (rows/columns of the original image), end-exclusive."""

    row_min: int
    col_min: int
    row_max: int
    col_max: int


@dataclass(frozen=True)
class Finding:
    """What boneflow found on one image.

    ``heatmap`` (Grad-CAM, values 0..1) and ``hotspot`` are in the source image's pixel grid
    (same rows x columns as the DICOM image) and are present only when analysed.
    ``reason`` says why an image was not analysed (no fracture model for the part, router
    below its confidence threshold, ...).
    """

    sop_instance_uid: str
    status: FindingStatus
    body_part: str | None
    body_part_confidence: float
    router: ModelId
    fracture_probability: float | None = None
    fracture_present: bool | None = None
    threshold: float | None = None
    fracture_model: ModelId | None = None
    reason: str | None = None
    laterality: str | None = None  # "L", "R" or None, from the DICOM header
    heatmap: npt.NDArray[np.float32] | None = field(default=None, repr=False, compare=False)
    hotspot: BoundingBox | None = None
    timings_ms: Mapping[str, float] = field(default_factory=dict)

    @property
    def models(self) -> dict[str, str]:
        """Model names and versions by role, for the audit log and the SR."""
        found = {"router": str(self.router)}
        if self.fracture_model is not None:
            found["fracture"] = str(self.fracture_model)
        return found
