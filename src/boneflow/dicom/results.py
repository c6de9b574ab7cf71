"""The result objects of one study (an SR and the Grad-CAM SCs), as datasets and as files."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from boneflow import PRODUCT_NAME, __version__
from boneflow.dicom.pixels import read_pixels
from boneflow.dicom.sc import build_secondary_capture
from boneflow.dicom.sr import build_structured_report
from boneflow.findings import Finding, FindingStatus
from boneflow.fsio import write_atomically

log = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
_LO_MAX = 64  # SeriesDescription is LO


@dataclass(frozen=True)
class ResultObjects:
    """What boneflow sends back for one study: one SR and one SC per analysed image."""

    sr: Dataset
    secondary_captures: tuple[Dataset, ...]
    timings_ms: Mapping[str, float] = field(default_factory=dict, compare=False)

    @property
    def study_instance_uid(self) -> str:
        """The source study, which every result object joins."""
        return str(self.sr.StudyInstanceUID)

    @property
    def datasets(self) -> tuple[Dataset, ...]:
        """The SCs first, then the SR that references them."""
        return (*self.secondary_captures, self.sr)


def build_result_objects(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    predecessor: Dataset | None = None,
    *,
    ae_title: str = PRODUCT_NAME,
    pixels: Mapping[str, npt.NDArray[np.float32]] | None = None,
) -> ResultObjects:
    """Build the SR and the SCs of one study from its images and their findings.

    Args:
        sources: the source radiographs (full datasets with pixels) of one study.
        findings: one finding per source, matched by SOP Instance UID.
        predecessor: the SR of an earlier analysis of this study, which this one supersedes.
        ae_title: our AE title, named as the observer device in the SR.
        pixels: display pixels already decoded (``read_pixels``), by SOP Instance UID;
            a source missing here is decoded again.

    Raises:
        ValueError: the sources span several studies or do not match the findings.
        UnreadableInstance: an analysed source's pixels cannot be decoded.
    """
    if not sources:
        raise ValueError("no source images")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"the sources span {len(studies)} studies; results join one study")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = [f.sop_instance_uid for f in findings if f.sop_instance_uid not in by_uid]
    if missing or len(findings) != len(by_uid):
        raise ValueError("findings and sources must match one to one by SOP Instance UID")
    started = time.perf_counter()
    sc_series = str(generate_uid())
    sc_description = series_description("Grad-CAM", findings)
    captures: dict[str, Dataset] = {}
    for finding in findings:
        if finding.status is not FindingStatus.ANALYSED:
            continue
        source = by_uid[finding.sop_instance_uid]
        display = (pixels or {}).get(finding.sop_instance_uid)
        captures[finding.sop_instance_uid] = build_secondary_capture(
            source,
            finding,
            read_pixels(source) if display is None else display,
            series_instance_uid=sc_series,
            series_number=SC_SERIES_NUMBER,
            instance_number=len(captures) + 1,
            series_description=sc_description,
        )
    sc_done = time.perf_counter()
    sr = build_structured_report(
        [by_uid[f.sop_instance_uid] for f in findings],
        findings,
        captures,
        series_instance_uid=str(generate_uid()),
        series_number=SR_SERIES_NUMBER,
        series_description=series_description("SR", findings),
        predecessor=predecessor,
        ae_title=ae_title,
    )
    log.info(
        "built results of study %s: SR %s and %d SC",
        sr.StudyInstanceUID,
        sr.SOPInstanceUID,
        len(captures),
    )
    timings = {
        "sc": round((sc_done - started) * 1000 / max(1, len(captures)), 2),  # per SC
        "sr": round((time.perf_counter() - sc_done) * 1000, 2),
    }
    return ResultObjects(sr=sr, secondary_captures=tuple(captures.values()), timings_ms=timings)


def series_description(kind: str, findings: Sequence[Finding]) -> str:
    """``boneflow <version> <kind> <models>``, cut to the 64 characters of an LO."""
    models: list[str] = []
    for finding in findings:
        for model in (finding.router, finding.fracture_model):
            if model is not None and str(model) not in models:
                models.append(str(model))
    text = f"{PRODUCT_NAME} {__version__} {kind} " + " ".join(models)
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 3] + "..."


def to_bytes(dataset: Dataset) -> bytes:
    """A result object as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def file_name(dataset: Dataset) -> str:
    """``SR-<uid>.dcm`` or ``SC-<uid>.dcm``."""
    prefix = "SR" if dataset.Modality == "SR" else "SC"
    return f"{prefix}-{dataset.SOPInstanceUID}.dcm"


def write_result_files(objects: ResultObjects, folder: Path) -> list[Path]:
    """Write every result object into ``folder``, each file complete or absent.

    Returns:
        The paths written, SCs first, then the SR.
    """
    return [write_atomically(folder / file_name(ds), to_bytes(ds)) for ds in objects.datasets]


def write_heatmap_pngs(objects: ResultObjects, folder: Path) -> list[Path]:
    """Write a PNG of each SC (the heat map over the radiograph) for people to look at."""
    return [write_heatmap_png(sc, folder) for sc in objects.secondary_captures]


def write_heatmap_png(sc: Dataset, folder: Path) -> Path:
    """Write ``SC-<uid>.png`` of one SC into ``folder``."""
    bgr = cv2.cvtColor(np.asarray(sc.pixel_array, dtype=np.uint8), cv2.COLOR_RGB2BGR)
    # zlib level 1 with the Up filter: as fast as OpenCV's default, 30 % smaller
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
    ok, encoded = cv2.imencode(".png", bgr, params)
    if not ok:
        raise OSError(f"cannot encode SC {sc.SOPInstanceUID} as PNG")
    return write_atomically(folder / f"SC-{sc.SOPInstanceUID}.png", encoded.tobytes())


def read_result_file(path: Path) -> Dataset:
    """Read a result file written by :func:`write_result_files`."""
    return dcmread(path)
