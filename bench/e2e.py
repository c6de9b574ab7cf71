"""End-to-end benchmark: a burst of single-image studies from dcmtk ``storescu`` into
``boneflow serve`` (embedded broker, SQLite), results sent to a receiving node.

Reports images/min and p50/p95 of the time from a study's settle moment (its analyse job
created) to its last result object stored at the destination, plus the same for the
time from the image's arrival, the load average (the machine is shared) and the median
of each stage from the audit log. Usage::

    .venv/bin/python bench/e2e.py --studies 100            # burst (one storescu run)
    .venv/bin/python bench/e2e.py --studies 30 --rate 0.5  # paced: one study every 2 s

Models: ``--model-dir`` (e.g. trained demo models); default the small real test models
of ``tests/model_fixtures.py`` registered in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port, wait_for  # noqa: E402
from tests.worker.nodes import BoneflowProcess, wait_for_echo  # noqa: E402

from boneflow.config import Destination, Settings  # noqa: E402
from boneflow.db.audit import Audit  # noqa: E402
from boneflow.db.migrate import upgrade  # noqa: E402
from boneflow.db.schema import (  # noqa: E402
    DispatchAttempt,
    Instance,
    Job,
    JobStateChange,
    OutboxItem,
    Result,
)
from boneflow.dicom.receiver import start_receiver  # noqa: E402

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--rate", type=float, default=0.0, help="studies/s; 0 = one burst")
    parser.add_argument("--shrink", type=int, default=1, help="subsample RG3 by this factor")
    parser.add_argument("--settle-seconds", type=float, default=1.0)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        raise SystemExit("dcmtk storescu is needed (apt-get install dcmtk)")
    work = Path(tempfile.mkdtemp(prefix="boneflow-e2e-"))
    try:
        return run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    model_dir = args.model_dir
    if model_dir is None:
        from tests.model_fixtures import make_test_models

        model_dir = work / "models"
        make_test_models(model_dir)
    receiver = start_receiver(work / "received", ae_title="DEST")
    settings = Settings(
        data_dir=work / "data",
        model_dir=model_dir,
        port=free_port(),
        settle_seconds=args.settle_seconds,
        destinations=(Destination("dimse", "DEST", "127.0.0.1", receiver.port),),
    )
    upgrade(settings.resolved_database_url)
    files = write_studies(work / "studies", args.studies, args.shrink)
    node = BoneflowProcess(["serve"], settings, work / "serve.log")
    try:
        wait_for_echo(settings, node, 180)
        warm_up(settings, receiver, work, node)
        started = time.time()
        send(settings, files, args.rate)
        sent = time.time()
        studies = {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in files}

        def done() -> bool:
            if not node.running:
                raise SystemExit(f"serve exited:\n{node.log_tail()}")
            got = {r.study_instance_uid for r in receiver.received() if r.sop_class_uid == SR_CLASS}
            return studies <= got

        load_before = os.getloadavg()
        wait_for(done, "all results", 60 + 10 * len(files))
        time.sleep(1.0)  # let the last SCs land
        report(settings, receiver, studies, started, sent, args, load_before)
    finally:
        node.terminate(60)
        node.close()
        receiver.stop()
    return 0


def write_studies(folder: Path, count: int, shrink: int) -> list[Path]:
    """``count`` single-image studies: the real CR radiograph RG3 with fresh UIDs."""
    folder.mkdir(parents=True)
    source = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"))
    pixels = source.pixel_array[::shrink, ::shrink].astype(np.uint16)
    paths = []
    for n in range(count):
        ds = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PatientID = f"E2E-{n:04d}"
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        path = folder / f"{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def warm_up(settings: Settings, receiver: object, work: Path, node: BoneflowProcess) -> None:
    """One study first, so that model loading is not part of the figures."""
    (path,) = write_studies(work / "warm-up", 1, 4)
    uid = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    send(settings, [path], 0.0)

    def arrived() -> bool:
        return any(
            r.study_instance_uid == uid and r.sop_class_uid == SR_CLASS
            for r in receiver.received()  # type: ignore[attr-defined]
        )

    wait_for(arrived, "the warm-up study", 300)


def send(settings: Settings, files: list[Path], rate: float) -> None:
    """storescu: all files in one association (burst), or one study per ``1/rate`` s."""
    base = ["storescu", "-aet", "PACS", "-aec", settings.ae_title, "-xe", "127.0.0.1",
            str(settings.port)]  # fmt: skip
    if rate <= 0:
        subprocess.run([*base, *map(str, files)], check=True)
        return
    next_at = time.monotonic()
    for path in files:
        next_at += 1.0 / rate
        subprocess.run([*base, str(path)], check=True)
        time.sleep(max(0.0, next_at - time.monotonic()))


def report(
    settings: Settings,
    receiver: object,
    studies: set[str],
    started: float,
    sent: float,
    args: argparse.Namespace,
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> None:
    """Print the figures as JSON and as a Markdown table row, then the stage medians."""
    arrived: dict[str, float] = {}
    for r in receiver.received():  # type: ignore[attr-defined]
        if r.study_instance_uid in studies:
            when = os.stat(r.path).st_mtime
            arrived[r.study_instance_uid] = max(arrived.get(r.study_instance_uid, 0.0), when)
    audit = Audit.open(settings.resolved_database_url)
    with audit.session() as session:
        settled = {
            s: _epoch(t)
            for s, t in session.execute(select(Job.study_instance_uid, Job.recorded_at))
            if s in studies
        }
        received = {
            s: _epoch(t)
            for s, t in session.execute(select(Instance.study_instance_uid, Instance.recorded_at))
            if s in studies
        }
    audit.close()
    from_settle = sorted(arrived[s] - settled[s] for s in studies)
    from_arrival = sorted(arrived[s] - received[s] for s in studies)
    last = max(arrived.values())
    figures = {
        "studies": len(studies),
        "mode": "burst" if args.rate <= 0 else f"paced {args.rate}/s",
        "image_pixels": f"{1760 // args.shrink}x{1760 // args.shrink}",
        "settle_seconds": args.settle_seconds,
        "send_seconds": round(sent - started, 2),
        "images_per_minute": round(len(studies) / (last - started) * 60, 1),
        "settle_to_results_p50_s": round(_quantile(from_settle, 0.5), 2),
        "settle_to_results_p95_s": round(_quantile(from_settle, 0.95), 2),
        "arrival_to_results_p50_s": round(_quantile(from_arrival, 0.5), 2),
        "arrival_to_results_p95_s": round(_quantile(from_arrival, 0.95), 2),
        "cpu_count": os.cpu_count(),
        "load_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(figures, indent=2))
    print("| " + " | ".join(str(v) for v in figures.values()) + " |")
    print(json.dumps({"stage_medians_ms": stage_medians(settings, studies)}, indent=2))


def stage_medians(settings: Settings, studies: set[str]) -> dict[str, float | None]:
    """Median of each stage of a study's way, from the audit log (milliseconds).

    settle wait: image stored → job created; queue wait: job created → running; job:
    running → succeeded; analyser per image and SC/SR as the worker timed them; to
    destination: succeeded → last object SENT; C-STORE: one object's send.
    """
    audit = Audit.open(settings.resolved_database_url)
    stages: dict[str, list[float]] = {k: [] for k in STAGES}
    with audit.session() as session:
        jobs = {
            job_id: (study, _epoch(created))
            for job_id, study, created in session.execute(
                select(Job.id, Job.study_instance_uid, Job.recorded_at)
            )
            if study in studies
        }
        stored = {
            study: _epoch(when)
            for study, when in session.execute(
                select(Instance.study_instance_uid, Instance.recorded_at)
            )
        }
        states: dict[int, dict[str, tuple[float, str | None]]] = {}
        for job_id, state, when, detail in session.execute(
            select(
                JobStateChange.job_id,
                JobStateChange.state,
                JobStateChange.recorded_at,
                JobStateChange.detail,
            ).order_by(JobStateChange.id)
        ):
            states.setdefault(job_id, {}).setdefault(state, (_epoch(when), detail))
        sent: dict[int, float] = {}
        for job_id, when, elapsed in session.execute(
            select(OutboxItem.job_id, DispatchAttempt.recorded_at, DispatchAttempt.elapsed_ms)
            .join(DispatchAttempt, DispatchAttempt.outbox_item_id == OutboxItem.id)
            .where(DispatchAttempt.status == "sent")
        ):
            if job_id in jobs:
                sent[job_id] = max(sent.get(job_id, 0.0), _epoch(when))
                stages["c_store"].append(float(elapsed or 0.0))
        for job_id, timings in session.execute(select(Result.job_id, Result.timings_ms)):
            if job_id in jobs:
                stages["analyser_per_image"].append(float(json.loads(timings).get("total", 0.0)))
    audit.close()
    for job_id, (study, created) in jobs.items():
        mine = states.get(job_id, {})
        stages["settle_wait"].append((created - stored[study]) * 1000)
        if "running" in mine:
            stages["queue_wait"].append((mine["running"][0] - created) * 1000)
        if "running" in mine and "succeeded" in mine:
            done, detail = mine["succeeded"]
            stages["job"].append((done - mine["running"][0]) * 1000)
            for part in (detail or "").partition(";")[2].split(","):
                name, _, value = part.strip().partition(" ")
                if name in ("sc", "sr") and value.endswith(" ms"):
                    stages[name].append(float(value[:-3]))
            if job_id in sent:
                stages["to_destination"].append((sent[job_id] - done) * 1000)
    return {k: round(statistics.median(v), 1) if v else None for k, v in stages.items()}


STAGES = (
    "settle_wait",
    "queue_wait",
    "job",
    "analyser_per_image",
    "sc",
    "sr",
    "to_destination",
    "c_store",
)


def _quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _epoch(value: datetime) -> float:
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    return value.timestamp()


if __name__ == "__main__":
    raise SystemExit(main())
