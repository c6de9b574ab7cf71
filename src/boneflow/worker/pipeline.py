"""From spooled files to findings: datasets → pixels → ``ImageInput`` → ``Analyzer`` → ``Finding``.

The :class:`~boneflow.models.inference.Analyzer` is cached per process (keyed by model
directory and device) so that a worker loads its models once; it is rebuilt only when a
newer router is registered.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from boneflow.config import Settings
from boneflow.db.audit import Audit, ResultStatus
from boneflow.dicom.pixels import laterality, read_pixels
from boneflow.errors import UnreadableInstance
from boneflow.findings import Finding, FindingStatus, ModelId
from boneflow.models.inference import Analyzer, FloatArray, ImageInput
from boneflow.models.registry import Registry

log = logging.getLogger(__name__)

UNDECODABLE = "pixel data could not be decoded"  # reason prefix of a failed image
_analyzers: dict[tuple[str, str], Analyzer] = {}  # one per process, see get_analyzer


def get_analyzer(settings: Settings) -> Analyzer:
    """The process's analyzer for MODEL_DIR and DEVICE, created (and models loaded) once.

    Raises:
        ModelNotFound: no router is registered.
        ConfigError: DEVICE is not usable.
    """
    key = (str(settings.resolved_model_dir.resolve()), settings.device)
    registry = Registry(settings.resolved_model_dir)
    cached = _analyzers.get(key)
    if cached is not None and cached.router_manifest.model_id == registry.router().model_id:
        return cached
    analyzer = Analyzer(registry, device=settings.device)
    _analyzers[key] = analyzer
    return analyzer


def load_datasets(paths: Sequence[Path]) -> list[Dataset]:
    """Read spooled files; a file that is missing or not DICOM is logged and left out."""
    datasets: list[Dataset] = []
    for path in paths:
        try:
            datasets.append(dcmread(path))
        except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
            log.error("cannot read spooled file %s: %s", path, exc)
    return datasets


def to_image_input(ds: Dataset) -> ImageInput:
    """Decode one dataset into the analyzer's input.

    Raises:
        UnreadableInstance: the pixel data cannot be decoded.
    """
    body_part = str(ds.get("BodyPartExamined", "") or "").strip() or None
    return ImageInput(
        sop_instance_uid=str(ds.SOPInstanceUID),
        pixels=read_pixels(ds),
        body_part_hint=body_part,
        laterality=laterality(ds),
    )


def analyse_datasets(
    settings: Settings,
    audit: Audit | None,
    datasets: Sequence[Dataset],
    job_id: int | None = None,
    decoded: dict[str, FloatArray] | None = None,
) -> list[Finding]:
    """Analyse a study's datasets; one :class:`Finding` per dataset, in order.

    An image whose pixels cannot be decoded gets a ``NOT_ANALYSED`` finding whose reason
    says so (and, with an ``audit``, a FAILED result row); the others go on. With an
    ``audit``, one result row per image is recorded. With ``decoded``, the display pixels
    of each decoded image are put there by SOP Instance UID, so that the Secondary
    Captures need not decode the image again.

    Raises:
        ModelNotFound: no router is registered.
    """
    (findings,) = analyse_groups(settings, [datasets], decoded)
    if audit is not None:
        for ds, finding in zip(datasets, findings, strict=True):
            failed = _is_undecodable(finding)
            record_result(audit, ds, finding, job_id, failed=failed)
    return findings


def analyse_groups(
    settings: Settings,
    groups: Sequence[Sequence[Dataset]],
    decoded: dict[str, FloatArray] | None = None,
) -> list[list[Finding]]:
    """Analyse several groups of datasets (jobs) with one batched pass of the models.

    Returns one list of findings per group, in order; see :func:`analyse_datasets`.

    Raises:
        ModelNotFound: no router is registered.
    """
    analyzer = get_analyzer(settings)
    router = ModelId(analyzer.router_manifest.name, analyzer.router_manifest.version)
    inputs: list[ImageInput] = []
    failed: dict[tuple[int, int], str] = {}
    for number, datasets in enumerate(groups):
        for index, ds in enumerate(datasets):
            try:
                inputs.append(to_image_input(ds))
                if decoded is not None:
                    decoded[inputs[-1].sop_instance_uid] = inputs[-1].pixels
            except UnreadableInstance as exc:
                log.error("%s", exc)
                failed[(number, index)] = f"{UNDECODABLE}: {exc}"
    analysed = iter(analyzer.analyse(inputs))
    results: list[list[Finding]] = []
    for number, datasets in enumerate(groups):
        findings: list[Finding] = []
        for index, ds in enumerate(datasets):
            reason = failed.get((number, index))
            if reason is None:
                findings.append(next(analysed))
                continue
            findings.append(
                Finding(
                    sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                    status=FindingStatus.NOT_ANALYSED,
                    body_part=None,
                    body_part_confidence=0.0,
                    router=router,
                    reason=reason,
                )
            )
        results.append(findings)
    return results


def _is_undecodable(finding: Finding) -> bool:
    return finding.status is not FindingStatus.ANALYSED and (finding.reason or "").startswith(
        UNDECODABLE
    )


def record_result(
    audit: Audit, ds: Dataset, finding: Finding, job_id: int | None, *, failed: bool = False
) -> None:
    """Record one image's finding in the audit log (FAILED when it could not be read)."""
    if failed:
        status = ResultStatus.FAILED
    elif finding.status == FindingStatus.ANALYSED:
        status = ResultStatus.ANALYSED
    else:
        status = ResultStatus.NOT_ANALYSED
    audit.result_recorded(
        sop_instance_uid=finding.sop_instance_uid,
        status=status,
        job_id=job_id,
        study_instance_uid=str(ds.get("StudyInstanceUID", "")) or None,
        body_part=finding.body_part,
        body_part_confidence=finding.body_part_confidence,
        fracture_probability=finding.fracture_probability,
        fracture_present=finding.fracture_present,
        threshold=finding.threshold,
        models=finding.models,
        timings_ms=finding.timings_ms,
        reason=finding.reason,
    )


__all__ = [
    "UNDECODABLE",
    "analyse_datasets",
    "analyse_groups",
    "get_analyzer",
    "load_datasets",
    "record_result",
    "to_image_input",
]
