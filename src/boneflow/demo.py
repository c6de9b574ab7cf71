"""``boneflow demo``: the whole round trip on this machine, with nothing configured.

Demo models are trained when none are registered; a node (``boneflow serve`` on embedded
defaults) runs under ``<out>/node``; a local destination stands in for the PACS (a private
Orthanc when installed, else the built-in receiver); sample radiographs (synthetic
fractures and negatives plus the real RG3 CR of pydicom-data) go in, and the findings,
the SR and SC files and a PNG of every heat map come out. Every process it starts is
stopped before it returns.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.exc import OperationalError, ProgrammingError

from boneflow import __version__
from boneflow.config import Destination, Settings
from boneflow.db.audit import Audit, DispatchStatus, ResultStatus
from boneflow.db.schema import DispatchAttempt, OutboxItem, Result
from boneflow.errors import BoneflowError, ModelNotFound
from boneflow.local_node import NodeProcess, quiet, start_node
from boneflow.orthanc import Orthanc, free_port, orthanc_executable

log = logging.getLogger(__name__)

SENDER_AE_TITLE = "DEMO-MODALITY"  # who sends the samples when no Orthanc runs
RECEIVER_AE_TITLE = "DEMO-PACS"  # the built-in receiver standing in for a PACS
MARKER = ".boneflow-demo"  # marks folders the demo made and may clear on the next run
RESULTS_TIMEOUT_SECONDS = 600.0
SYNTHETIC_SAMPLES: tuple[tuple[str, bool], ...] = (
    ("wrist", True),
    ("hand", False),
    ("forearm", True),
    ("elbow", False),
)
REAL_SAMPLES: tuple[str, ...] = ("RG3_UNCR.dcm",)
_SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # the Structured Report storage classes
_SC_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # the Secondary Capture storage classes


class DemoError(BoneflowError):
    """The demo could not complete (the message says where to look)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample radiograph the demo sends, with what it truly shows when known."""

    label: str
    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    truth: str


@dataclass(frozen=True, slots=True)
class SampleResult:
    """What the node recorded for one sample."""

    sample: Sample
    status: str
    body_part: str | None
    body_part_confidence: float | None
    fracture_probability: float | None
    fracture_present: bool | None
    threshold: float | None
    models: str
    reason: str | None


def run_demo(settings: Settings, out_dir: Path, keep_open: bool = False) -> int:
    """Run the round trip and print the findings; returns the exit status.

    Args:
        settings: the configuration; the demo uses its model folder, device, AE title and
            log level, and runs the node on embedded defaults under ``out_dir``.
        out_dir: where samples, node state, results and heat-map PNGs are written.
        keep_open: keep Orthanc and the node running until Ctrl-C, to browse the results.
    """
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "node.log").unlink(missing_ok=True)
    console.rule(f"boneflow {__version__} demo — not for diagnostic use")
    model_dir = ensure_demo_models(settings, console)
    with quiet(["boneflow.training"]):
        samples = make_samples(_fresh(out_dir / "samples"))
    console.print(f"{len(samples)} sample radiographs in {out_dir / 'samples'}")
    node = replace(
        settings,
        data_dir=_fresh(out_dir / "node"),
        model_dir=model_dir,
        database_url="",
        broker_url="",
        host="127.0.0.1",
        port=free_port(),
        settle_seconds=1.0,
        metrics_port=0,
        tls_cert=None,
        tls_key=None,
        tls_ca=None,
    )
    with ExitStack() as stack:
        orthanc: Orthanc | None = None
        if orthanc_executable() is not None:
            boneflow_node = Destination("dimse", node.ae_title, "127.0.0.1", node.port)
            orthanc = Orthanc(_fresh(out_dir / "orthanc"), boneflow_node)
            console.print("Starting a private Orthanc (the PACS of this demo)")
            stack.enter_context(orthanc)
            node = replace(node, destinations=(orthanc.node,))
            node = _allow(node, orthanc.ae_title)
            received_dir = out_dir / "orthanc"
        else:
            from boneflow.dicom.receiver import start_receiver

            console.print("Orthanc is not installed: results go to the built-in receiver")
            received_dir = _fresh(out_dir / "received")
            receiver = stack.enter_context(start_receiver(received_dir, ae_title=RECEIVER_AE_TITLE))
            receiver_node = Destination("dimse", RECEIVER_AE_TITLE, "127.0.0.1", receiver.port)
            node = replace(node, destinations=(receiver_node,))
            node = _allow(node, SENDER_AE_TITLE)
        console.print(f"Starting the node {node.ae_title}@127.0.0.1:{node.port} ({node.data_dir})")
        process = stack.enter_context(start_node(node, out_dir / "node.log"))
        _send_samples(node, samples, orthanc, console)
        results = wait_for_results(node, samples, console, node_process=process)
        files = collect_result_files(results, orthanc, received_dir, out_dir / "results")
        print_findings(results, Console(width=None if sys.stdout.isatty() else 160))
        _write_summary(out_dir, results, files)
        console.print(f"Result files and heat-map PNGs: {out_dir / 'results'}")
        if orthanc is not None:
            study = samples[-1].study_instance_uid
            console.print(f"Orthanc explorer: {orthanc.explorer_url(study)}")
            if keep_open:
                _wait_for_interrupt(console)
    console.print("Done; every process the demo started has stopped.")
    return 0


def ensure_demo_models(settings: Settings, console: Console) -> Path:
    """Train and register the demo models unless a router and a fracture model exist.

    Returns:
        The (absolute) model folder the node will use.
    """
    from boneflow.models.registry import Registry

    model_dir = settings.resolved_model_dir.resolve()
    registry = Registry(model_dir)
    try:
        registry.router()
        has_fracture_model = any(m.task == "fracture" for m in registry.list())
    except ModelNotFound:
        has_fracture_model = False
    if has_fracture_model:
        console.print(f"Using the models registered in {model_dir}")
        return model_dir
    from boneflow.training.demo import train_demo_models

    console.print(
        f"No models in {model_dir}: training small demo models on synthetic radiographs "
        "(about 10 minutes on 2 idle CPU cores; only the first time)"
    )
    train_demo_models(replace(settings, model_dir=model_dir), progress=True)
    return model_dir


def make_samples(folder: Path, seed: int = 7) -> list[Sample]:
    """Write the synthetic samples (with their truth) and copy the real ones into ``folder``."""
    from boneflow.training.synth import synth_command

    samples: list[Sample] = []
    for index, (part, fractured) in enumerate(SYNTHETIC_SAMPLES):
        target = folder / f"synthetic-{index + 1}-{part}"
        synth_command(
            out_dir=target,
            count=1,
            seed=seed + index,
            fmt="dicom",
            size=512,
            fracture_rate=1.0 if fractured else 0.0,
            parts=[part],
        )
        samples.extend(_synthetic_samples(target))
    for name in REAL_SAMPLES:
        samples.append(_real_sample(name, folder))
    return samples


def wait_for_results(
    settings: Settings,
    samples: Sequence[Sample],
    console: Console,
    timeout_seconds: float = RESULTS_TIMEOUT_SECONDS,
    node_process: NodeProcess | None = None,
) -> list[SampleResult]:
    """Wait until every sample has a result and every result object has been delivered.

    Raises:
        DemoError: the time is up (what is missing is named), or the node died.
    """
    audit = Audit.open(settings.resolved_database_url)
    try:
        deadline = time.monotonic() + timeout_seconds
        with console.status("Waiting for the node's findings and their delivery") as status:
            while True:
                results, pending = _progress(audit, samples)
                done = len(results) == len(samples) and pending == 0
                if done:
                    return [results[s.sop_instance_uid] for s in samples]
                if node_process is not None and not node_process.running:
                    raise DemoError(f"the node stopped:\n{node_process.log_tail()}")
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"after {timeout_seconds:.0f} s, {len(results)}/{len(samples)} images "
                        f"have results and {pending} result objects are undelivered; "
                        f"see the node log and `boneflow status --data-dir {settings.data_dir}`"
                    )
                status.update(
                    f"Waiting for findings: {len(results)}/{len(samples)} images analysed, "
                    f"{pending} result objects on their way"
                )
                time.sleep(0.5)
    finally:
        audit.close()


def collect_result_files(
    results: Sequence[SampleResult],
    orthanc: Orthanc | None,
    received_dir: Path,
    folder: Path,
) -> list[Path]:
    """Copy the SR and SC objects the destination received into ``folder``, with PNGs.

    Each study gets a folder named after its sample; every Secondary Capture (the
    radiograph with its Grad-CAM heat map) is also written as a PNG.
    """
    folder = _fresh(folder)
    written: list[Path] = []
    for result in results:
        sample = result.sample
        target = folder / sample.label
        target.mkdir(parents=True, exist_ok=True)
        for name, data in _received_objects(sample.study_instance_uid, orthanc, received_dir):
            path = target / name
            path.write_bytes(data)
            written.append(path)
            if name.startswith("sc-"):
                ds = pydicom.dcmread(path)
                png = path.with_suffix(".png")
                write_png(ds, png)
                written.append(png)
    return written


def print_findings(results: Sequence[SampleResult], console: Console) -> None:
    """The findings of every sample image as a table."""
    table = Table(title="boneflow findings (not for diagnostic use)")
    for column in ("image", "truth", "body part", "P(fracture)", "call", "models / reason"):
        table.add_column(column)
    for result in results:
        part = result.body_part or "—"
        if result.body_part_confidence is not None:
            part = f"{part} ({result.body_part_confidence:.2f})"
        probability = "—"
        if result.fracture_probability is not None:
            probability = f"{result.fracture_probability:.3f}"
            if result.threshold is not None:
                probability += f" (thr {result.threshold:.2f})"
        call = result.status.replace("_", " ")
        if result.fracture_present is not None:
            call = "fracture" if result.fracture_present else "no fracture"
        detail = result.reason if result.status != ResultStatus.ANALYSED else result.models
        table.add_row(result.sample.label, result.sample.truth, part, probability, call, detail)
    console.print(table)


def write_png(ds: pydicom.Dataset, path: Path) -> None:
    """Write the first frame of an image object as an 8-bit PNG."""
    import cv2

    pixels = np.asarray(ds.pixel_array)
    if pixels.ndim == 4 or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
        pixels = pixels[0]
    if pixels.dtype != np.uint8:
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels.astype(np.float32) - low) / max(high - low, 1e-6) * 255.0
        pixels = scaled.astype(np.uint8)
    if pixels.ndim == 3:
        if str(ds.get("PhotometricInterpretation", "RGB")).startswith("YBR"):
            pixels = cv2.cvtColor(pixels, cv2.COLOR_YCrCb2RGB)
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    elif str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = 255 - pixels
    if not cv2.imwrite(str(path), pixels):
        raise DemoError(f"cannot write {path}")


# ---- helpers ---------------------------------------------------------------------------


def _fresh(folder: Path) -> Path:
    """An empty folder the demo owns: cleared only if an earlier demo run made it."""
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).exists():
            raise DemoError(f"{folder} exists and was not made by the demo; choose another --out")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("made by boneflow demo; cleared on its next run\n")
    return folder


def _allow(settings: Settings, ae_title: str) -> Settings:
    from boneflow.config import CallerRule

    return replace(settings, allowed_callers=(CallerRule(ae_title=ae_title, host="127.0.0.1"),))


def _synthetic_samples(folder: Path) -> list[Sample]:
    labels = folder / "labels.csv"
    samples = []
    with labels.open(newline="") as handle:
        for row in csv.DictReader(handle):
            path = folder / row["file"]
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            fractured = row["fractured"].strip().lower() in {"1", "true", "yes"}
            truth = f"{row['body_part']}, {'fracture' if fractured else 'no fracture'}"
            if fractured and row.get("difficulty"):
                truth += f" ({row['difficulty']})"
            samples.append(
                Sample(
                    label=folder.name,
                    path=path,
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    study_instance_uid=str(ds.StudyInstanceUID),
                    truth=truth,
                )
            )
    return samples


def _real_sample(name: str, folder: Path) -> Sample:
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name, download=False)
    if found is None:
        raise DemoError(f"{name} is missing: install pydicom-data (pip install pydicom-data)")
    target = folder / f"real-{name}"
    shutil.copyfile(str(found), target)
    ds = pydicom.dcmread(target, stop_before_pixels=True)
    return Sample(
        label=f"real-{Path(name).stem}",
        path=target,
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        truth=f"real CR, {str(ds.get('BodyPartExamined', '')).lower() or 'unknown'}",
    )


def _send_samples(
    settings: Settings, samples: Sequence[Sample], orthanc: Orthanc | None, console: Console
) -> None:
    if orthanc is not None:
        console.print("Uploading the samples to Orthanc, which forwards CR/DX to boneflow")
        for sample in samples:
            orthanc.upload(sample.path.read_bytes())
        return
    from boneflow.dicom.send import store_datasets

    console.print("Sending the samples to the node by C-STORE")
    destination = Destination("dimse", settings.ae_title, "127.0.0.1", settings.port)
    statuses = store_datasets(destination, [s.path for s in samples], settings, SENDER_AE_TITLE)
    if any(status != 0 for status in statuses):
        raise DemoError(f"the node refused samples: statuses {[hex(s) for s in statuses]}")


def _progress(audit: Audit, samples: Sequence[Sample]) -> tuple[dict[str, SampleResult], int]:
    """Results recorded so far (by SOP Instance UID) and result objects not yet delivered."""
    by_uid = {s.sop_instance_uid: s for s in samples}
    found: dict[str, SampleResult] = {}
    try:
        with audit.session() as session:
            rows = session.scalars(select(Result).where(Result.sop_instance_uid.in_(by_uid)))
            for row in rows:
                found[row.sop_instance_uid] = _sample_result(by_uid[row.sop_instance_uid], row)
            studies = {s.study_instance_uid for s in samples}
            items = list(
                session.scalars(
                    select(OutboxItem).where(OutboxItem.study_instance_uid.in_(studies))
                )
            )
            delivered = set(
                session.scalars(
                    select(DispatchAttempt.outbox_item_id).where(
                        DispatchAttempt.status.in_([DispatchStatus.SENT, DispatchStatus.GAVE_UP])
                    )
                )
            )
    except (OperationalError, ProgrammingError):  # the node has not made its tables yet
        return {}, 0
    expected = sum(1 for r in found.values() if r.status == ResultStatus.ANALYSED)
    expected += len({r.sample.study_instance_uid for r in found.values()})  # one SR a study
    pending = sum(1 for item in items if item.id not in delivered)
    return found, pending + max(0, expected - len(items))


def _sample_result(sample: Sample, row: Result) -> SampleResult:
    try:
        by_role: dict[str, str] = json.loads(row.models)
        models = ", ".join(by_role[k] for k in sorted(by_role, key=lambda role: role != "router"))
    except (ValueError, AttributeError):
        models = row.models
    return SampleResult(
        sample=sample,
        status=row.status,
        body_part=row.body_part,
        body_part_confidence=row.body_part_confidence,
        fracture_probability=row.fracture_probability,
        fracture_present=row.fracture_present,
        threshold=row.threshold,
        models=models,
        reason=row.reason,
    )


def _received_objects(
    study_instance_uid: str, orthanc: Orthanc | None, received_dir: Path
) -> Iterator[tuple[str, bytes]]:
    """(file name, bytes) of every SR and Secondary Capture the destination holds for a study."""
    if orthanc is not None:
        for instance in orthanc.study_instances(study_instance_uid):
            kind = _kind(instance.sop_class_uid)
            if kind:
                data = orthanc.instance_file(instance.orthanc_id)
                yield f"{kind}-{instance.sop_instance_uid}.dcm", data
        return
    for path in sorted((received_dir / study_instance_uid).rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        kind = _kind(str(ds.SOPClassUID))
        if kind:
            yield f"{kind}-{ds.SOPInstanceUID}.dcm", path.read_bytes()


def _kind(sop_class_uid: str) -> str:
    """ "sr" or "sc" for boneflow's result objects, "" for anything else (the sources)."""
    if sop_class_uid.startswith(_SR_CLASS_PREFIX):
        return "sr"
    if sop_class_uid.startswith(_SC_CLASS_PREFIX):
        return "sc"
    return ""


def _write_summary(out_dir: Path, results: Sequence[SampleResult], files: Sequence[Path]) -> None:
    summary = {
        "boneflow": __version__,
        "not_for_diagnostic_use": True,
        "images": [
            {
                "image": r.sample.label,
                "truth": r.sample.truth,
                "sop_instance_uid": r.sample.sop_instance_uid,
                "study_instance_uid": r.sample.study_instance_uid,
                "status": r.status,
                "body_part": r.body_part,
                "body_part_confidence": r.body_part_confidence,
                "fracture_probability": r.fracture_probability,
                "fracture_present": r.fracture_present,
                "threshold": r.threshold,
                "models": r.models,
                "reason": r.reason,
            }
            for r in results
        ],
        "files": [str(path.relative_to(out_dir)) for path in files],
    }
    (out_dir / "findings.json").write_text(json.dumps(summary, indent=2) + "\n")


def _wait_for_interrupt(console: Console) -> None:
    console.print("Orthanc and the node keep running; press Ctrl-C to stop them.")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("Stopping")
