"""Helpers of the results tests: real radiographs, findings with synthetic heat maps,
strict read-back and dciodvfy.

The findings are real values built the way the analyser builds them (a Gaussian Grad-CAM
map in the source pixel grid, a hot-spot box around its peak), not mocks.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.config import RAISE
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from boneflow.findings import BoundingBox, Finding, FindingStatus, ModelId

ROUTER = ModelId("bodypart-router", "1.3.0")
WRIST_MODEL = ModelId("wrist-fracture", "2.1.0")


def radiograph(name: str) -> Dataset:
    """A real CR radiograph of pydicom-data, read fully (with pixels)."""
    found = get_testdata_file(name)
    assert found is not None, f"pydicom-data lacks {name}"
    return pydicom.dcmread(str(found))


def analysed_finding(
    source: Dataset,
    probability: float = 0.83,
    threshold: float = 0.5,
    present: bool | None = True,
    body_part: str = "wrist",
    laterality: str | None = "R",
    centre: tuple[int, int] | None = None,
) -> Finding:
    """An analysed finding with a Gaussian heat map and the box around its hot spot."""
    rows, cols = int(source.Rows), int(source.Columns)
    row0, col0 = centre or (rows // 2, cols // 2)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    sigma_r, sigma_c = rows / 12.0, cols / 10.0
    heat = np.exp(-(((yy - row0) / sigma_r) ** 2 + ((xx - col0) / sigma_c) ** 2)).astype(np.float32)
    box = BoundingBox(
        row_min=max(0, int(row0 - 1.5 * sigma_r)),
        col_min=max(0, int(col0 - 1.5 * sigma_c)),
        row_max=min(rows, int(row0 + 1.5 * sigma_r)),
        col_max=min(cols, int(col0 + 1.5 * sigma_c)),
    )
    return Finding(
        sop_instance_uid=str(source.SOPInstanceUID),
        status=FindingStatus.ANALYSED,
        body_part=body_part,
        body_part_confidence=0.97,
        router=ROUTER,
        fracture_probability=probability,
        fracture_present=present,
        threshold=threshold,
        fracture_model=WRIST_MODEL,
        laterality=laterality,
        heatmap=heat,
        hotspot=box,
        timings_ms={"router": 12.0, "fracture": 30.0, "gradcam": 25.0},
    )


def not_analysed_finding(source: Dataset, reason: str = "no fracture model for chest") -> Finding:
    """A finding of an image the router placed where no fracture model covers."""
    return Finding(
        sop_instance_uid=str(source.SOPInstanceUID),
        status=FindingStatus.NOT_ANALYSED,
        body_part="other",
        body_part_confidence=0.91,
        router=ROUTER,
        reason=reason,
    )


def strict_read(data: bytes, monkeypatch: pytest.MonkeyPatch) -> Dataset:
    """Read a Part 10 file under pydicom's strict validation, converting every value."""
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", RAISE)
    ds = pydicom.dcmread(io.BytesIO(data))
    for element in ds.iterall():  # value conversion is where validation happens
        _ = element.value
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    return ds


def dciodvfy(data: bytes, folder: Path) -> tuple[list[str], list[str]]:
    """Run dicom3tools' dciodvfy; returns its (error, warning) lines."""
    path = folder / "object.dcm"
    path.write_bytes(data)
    done = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = (done.stdout + done.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings
