"""``boneflow analyze PATH... [--out DIR] [--json]``: the analysis on local files, no network.

Files and folders (searched recursively) are read, grouped by study, analysed in batches
with the registered models and printed as a table or as JSON (one object per file). With
``--out DIR``, each study's SR, its Secondary Captures and a PNG of each SC are written
under ``DIR/<StudyInstanceUID>/`` (``boneflow.dicom.results``). Nothing is written to the
audit log: this is a local tool. Exit status 0 when every file was read (and written),
1 when some could not be, 2 when there are no models.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from boneflow.config import Settings
from boneflow.dicom.results import build_result_objects, write_heatmap_pngs, write_result_files
from boneflow.errors import BoneflowError, ModelNotFound
from boneflow.findings import Finding, FindingStatus
from boneflow.worker.pipeline import UNDECODABLE, analyse_datasets

log = logging.getLogger(__name__)

BATCH = 16


def analyze_files(
    settings: Settings, paths: Sequence[Path], out_dir: Path | None, as_json: bool
) -> int:
    """Analyse local DICOM files and print the findings; see the module docstring."""
    records: list[dict[str, Any]] = []
    loaded: list[tuple[Path, Dataset]] = []
    for path in _files(paths, records):
        try:
            loaded.append((path, dcmread(path)))
        except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
            records.append(_failed(path, f"not a readable DICOM file: {exc}"))

    by_study: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, ds in loaded:
        by_study.setdefault(str(ds.get("StudyInstanceUID", "")), []).append((path, ds))
    written_ok = True
    try:
        for study, members in by_study.items():
            findings: list[Finding] = []
            for start in range(0, len(members), BATCH):
                chunk = [ds for _, ds in members[start : start + BATCH]]
                findings.extend(analyse_datasets(settings, None, chunk))
            for (path, ds), finding in zip(members, findings, strict=True):
                records.append(_record(path, ds, finding))
            if out_dir is not None:
                written_ok &= _write_results(out_dir, study, [ds for _, ds in members], findings)
    except ModelNotFound as exc:
        print(f"boneflow: {exc} (train some with: boneflow train --demo)", file=sys.stderr)
        return 2
    _print(records, as_json)
    failed = any(r["status"] == "failed" for r in records)
    return 1 if failed or not written_ok else 0


# --- helpers -----------------------------------------------------------------------------------


def _files(paths: Sequence[Path], records: list[dict[str, Any]]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from (p for p in sorted(path.rglob("*")) if p.is_file())
        elif path.is_file():
            yield path
        else:
            records.append(_failed(path, "no such file or folder"))


def _failed(path: Path, reason: str) -> dict[str, Any]:
    return {"path": str(path), "status": "failed", "reason": reason}


def _record(path: Path, ds: Dataset, finding: Finding) -> dict[str, Any]:
    models: dict[str, Any] = {
        "router": {"name": finding.router.name, "version": finding.router.version},
        "fracture": None,
    }
    if finding.fracture_model is not None:
        models["fracture"] = {
            "name": finding.fracture_model.name,
            "version": finding.fracture_model.version,
        }
    box = finding.hotspot
    failed = finding.reason is not None and finding.reason.startswith(UNDECODABLE)
    return {
        "path": str(path),
        "sop_instance_uid": finding.sop_instance_uid,
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "status": "failed" if failed else str(finding.status),
        "body_part": finding.body_part,
        "body_part_confidence": round(finding.body_part_confidence, 4),
        "fracture_probability": _round(finding.fracture_probability),
        "fracture_present": finding.fracture_present,
        "threshold": _round(finding.threshold),
        "reason": finding.reason,
        "laterality": finding.laterality,
        "models": models,
        "hotspot": None
        if box is None
        else {
            "row_min": box.row_min,
            "col_min": box.col_min,
            "row_max": box.row_max,
            "col_max": box.col_max,
        },
        "timings_ms": dict(finding.timings_ms),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _print(records: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(records, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="boneflow analyze (not for diagnostic use)")
    table.add_column("file")
    table.add_column("body part")
    table.add_column("P(fracture)")
    table.add_column("decision", no_wrap=True)
    table.add_column("models")
    table.add_column("ms")
    table.add_column("note")
    for r in records:
        if r["status"] == "failed" or r["status"] == str(FindingStatus.NOT_ANALYSED):
            part = r.get("body_part") or "-"
            table.add_row(Path(r["path"]).name, part, "-", "not analysed", "", "", r["reason"])
            continue
        models = r["models"]
        names = f"{models['router']['name']}@{models['router']['version']}, "
        names += f"{models['fracture']['name']}@{models['fracture']['version']}"
        table.add_row(
            Path(r["path"]).name,
            f"{r['body_part']} ({r['body_part_confidence']:.2f})",
            f"{r['fracture_probability']:.3f}",
            "fracture" if r["fracture_present"] else "no fracture",
            names,
            f"{r['timings_ms'].get('total', 0.0):.0f}",
            f"threshold {r['threshold']:.2f}",
        )
    Console().print(table)


def _write_results(
    out_dir: Path, study: str, datasets: list[Dataset], findings: list[Finding]
) -> bool:
    """The study's SR, SCs and SC PNGs under ``out_dir/<study>/``; False on failure."""
    folder = out_dir / (study or "unknown-study")
    try:
        objects = build_result_objects(datasets, findings)
        written = write_result_files(objects, folder) + write_heatmap_pngs(objects, folder)
    except (BoneflowError, ValueError, OSError) as exc:
        print(f"boneflow: could not write the results of study {study}: {exc}", file=sys.stderr)
        return False
    log.info("wrote %d result files for study %s into %s", len(written), study, folder)
    return True


__all__ = ["analyze_files"]
