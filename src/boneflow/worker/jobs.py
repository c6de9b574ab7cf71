"""What an analyse job does, end to end, given its id: the worker side of the seams.

Read the job's instances from the audit database, load them from the spool, analyse
them (``worker.pipeline``), record one result per image, build the SR and the Secondary
Captures (``dicom.results``) and put them in the outbox (``worker.outbox``).

Idempotency: a job produces its results once. When an earlier attempt of the same job
already put result objects in the outbox (it died after that, before SUCCEEDED), those
are returned instead of analysing again; so a redelivered task never produces a second
SR or SC. Each image is covered by exactly one job (settle), so SOP Instance UID + the
model versions recorded with its result identify the analysis.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import exists, select
from sqlalchemy.orm import aliased

from boneflow.config import Settings
from boneflow.db.audit import Audit, JobKind, JobState
from boneflow.db.schema import Instance, Job, JobInstance, JobStateChange, OutboxItem, Result
from boneflow.errors import UnreadableInstance

if TYPE_CHECKING:
    from boneflow.findings import Finding
    from boneflow.models.inference import FloatArray

UNDECODABLE = "pixel data could not be decoded"  # = boneflow.worker.pipeline.UNDECODABLE

log = logging.getLogger(__name__)

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
PIPELINE_CHUNK = 4  # jobs per model pass when several run together


@dataclass(frozen=True, slots=True)
class JobInstanceRecord:
    """One image an analyse job covers, with where the spool keeps it."""

    sop_instance_uid: str
    instance_id: int | None
    spool_path: Path | None


@dataclass(frozen=True, slots=True)
class JobRecord:
    """An analyse job as the worker needs it."""

    job_id: int
    study_instance_uid: str | None
    patient_id: str | None
    instances: tuple[JobInstanceRecord, ...]


def load_job(audit: Audit, job_id: int) -> JobRecord:
    """The job and its instances with their spool paths.

    Raises:
        LookupError: when there is no such job.
    """
    with audit.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"no job {job_id}")
        rows = session.execute(
            select(JobInstance.sop_instance_uid, JobInstance.instance_id, Instance.spool_path)
            .outerjoin(Instance, Instance.id == JobInstance.instance_id)
            .where(JobInstance.job_id == job_id)
            .order_by(JobInstance.id)
        ).all()
    instances = tuple(
        JobInstanceRecord(uid, instance_id, Path(path) if path else None)
        for uid, instance_id, path in rows
    )
    return JobRecord(job_id, job.study_instance_uid, job.patient_id, instances)


def run_analysis(settings: Settings, audit: Audit, job: JobRecord) -> list[int]:
    """Analyse a job's images and queue its result objects; returns the outbox item ids."""
    outcome = run_analyses(settings, audit, [job])[job.job_id]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome.outbox_ids


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What a finished analyse job produced: its outbox items, and where its time went."""

    outbox_ids: list[int]
    timings_ms: Mapping[str, float]

    def describe(self) -> str:
        """The SUCCEEDED detail: ``2 to send; sc 31 ms, sr 40 ms``."""
        stages = ", ".join(f"{k} {v:.0f} ms" for k, v in self.timings_ms.items())
        return f"{len(self.outbox_ids)} to send" + (f"; {stages}" if stages else "")


def run_analyses(
    settings: Settings,
    audit: Audit,
    jobs: Sequence[JobRecord],
    on_done: Callable[[JobRecord, JobOutcome | Exception], None] | None = None,
) -> dict[int, JobOutcome | Exception]:
    """Run several analyse jobs with one batched pass of the models.

    Each job is isolated: what goes wrong with one (its files, its result objects) is
    returned as that job's exception and the others go on. An error of a shared
    analysis pass is returned for every job of its chunk. The models see chunks of
    ``PIPELINE_CHUNK`` jobs, one chunk ahead of the building of the result objects.
    ``on_done`` is called with each job's outcome as soon as it is known, so that its
    results need not wait for the rest of the batch.

    Returns:
        By job id: what it produced, or the exception that stopped it.
    """
    outcomes = _Outcomes(on_done)
    pending: list[_Pending] = []
    for job in jobs:
        try:
            produced = outbox_items_of_job(audit, job.job_id)
            if produced:
                log.info(
                    "job %s already produced %d outbox items; reusing", job.job_id, len(produced)
                )
                outcomes.set(job, JobOutcome(produced, {}))
                continue
            pending.append((job, _load_sources(job), recorded_results(audit, job.job_id)))
        except Exception as exc:  # noqa: BLE001 - this job only; the batch goes on
            outcomes.set(job, exc)
    chunks = [pending[i : i + PIPELINE_CHUNK] for i in range(0, len(pending), PIPELINE_CHUNK)]
    if not chunks:
        return outcomes
    # The models run on a helper thread, one chunk ahead, while this thread builds and
    # stores the previous chunk's SR and SCs: torch, OpenCV and zlib release the GIL.
    with ThreadPoolExecutor(1, thread_name_prefix="boneflow-analyser") as analyser:
        ahead = analyser.submit(_analyse_chunk, settings, chunks[0])
        for number, chunk in enumerate(chunks):
            current = ahead
            if number + 1 < len(chunks):
                ahead = analyser.submit(_analyse_chunk, settings, chunks[number + 1])
            try:
                groups, decoded = current.result()
            except Exception as exc:  # noqa: BLE001 - the shared pass failed: each job in it did
                for job, _, _ in chunk:
                    outcomes.set(job, exc)
                continue
            for (job, datasets, recorded), findings in zip(chunk, groups, strict=True):
                try:
                    outcome: JobOutcome | Exception = _finish(
                        settings, audit, job, datasets, findings, recorded, decoded
                    )
                except Exception as exc:  # noqa: BLE001 - this job only
                    outcome = exc
                outcomes.set(job, outcome)
    return outcomes


_Pending = tuple[JobRecord, list[Dataset], set[tuple[str, str]]]


class _Outcomes(dict[int, "JobOutcome | Exception"]):
    """Outcomes by job id that report each one as it is set."""

    def __init__(self, on_done: Callable[[JobRecord, JobOutcome | Exception], None] | None):
        super().__init__()
        self.on_done = on_done

    def set(self, job: JobRecord, outcome: JobOutcome | Exception) -> None:
        self[job.job_id] = outcome
        if self.on_done is not None:
            self.on_done(job, outcome)


def _analyse_chunk(
    settings: Settings, chunk: Sequence[_Pending]
) -> tuple[list[list[Finding]], dict[str, FloatArray]]:
    """The findings of a chunk of jobs and their decoded pixels (each image decoded once)."""
    from boneflow.worker.pipeline import analyse_groups

    decoded: dict[str, FloatArray] = {}
    groups = analyse_groups(settings, [datasets for _, datasets, _ in chunk], decoded)
    return groups, decoded


def queued_analyse_jobs(audit: Audit, exclude: int, limit: int) -> list[int]:
    """Analyse jobs still waiting for their first attempt (latest state QUEUED), oldest first."""
    if limit <= 0:
        return []
    later = aliased(JobStateChange)
    query = (
        select(JobStateChange.job_id)
        .join(Job, Job.id == JobStateChange.job_id)
        .where(
            JobStateChange.state == str(JobState.QUEUED),
            JobStateChange.job_id != exclude,
            Job.kind == str(JobKind.ANALYSE),
            ~exists().where(later.job_id == JobStateChange.job_id, later.id > JobStateChange.id),
        )
        .order_by(JobStateChange.job_id)
        .limit(limit)
    )
    with audit.session() as session:
        return [int(job_id) for job_id in session.scalars(query)]


def _load_sources(job: JobRecord) -> list[Dataset]:
    from boneflow.worker.pipeline import load_datasets

    paths = [i.spool_path for i in job.instances if i.spool_path is not None]
    datasets = load_datasets(paths)
    if not datasets:
        raise UnreadableInstance(f"none of the {len(job.instances)} spooled files is readable")
    return datasets


def _finish(
    settings: Settings,
    audit: Audit,
    job: JobRecord,
    datasets: list[Dataset],
    findings: list[Finding],
    recorded: set[tuple[str, str]],
    decoded: dict[str, FloatArray],
) -> JobOutcome:
    """Record a job's results (what an earlier attempt did not), build and queue its objects."""
    from boneflow.dicom.results import build_result_objects
    from boneflow.worker.outbox import enqueue_results
    from boneflow.worker.pipeline import record_result

    # An earlier attempt that died after recording results: the same models and images
    # give the same findings; only what is missing is recorded.
    for ds, finding in zip(datasets, findings, strict=True):
        if (finding.sop_instance_uid, _models_key(finding.models)) not in recorded:
            failed = finding.reason is not None and finding.reason.startswith(UNDECODABLE)
            record_result(audit, ds, finding, job.job_id, failed=failed)
    predecessor = previous_report(settings, audit, job)
    objects = build_result_objects(
        datasets, findings, predecessor=predecessor, ae_title=settings.ae_title, pixels=decoded
    )
    outbox_ids = enqueue_results(settings, audit, objects, job.job_id, background_pngs=True)
    return JobOutcome(list(outbox_ids), objects.timings_ms)


def recorded_results(audit: Audit, job_id: int) -> set[tuple[str, str]]:
    """(SOP Instance UID, models) of the results ``job_id`` has recorded so far."""
    with audit.session() as session:
        rows = session.execute(
            select(Result.sop_instance_uid, Result.models).where(Result.job_id == job_id)
        ).all()
    return {(uid, _models_key(json.loads(models or "{}"))) for uid, models in rows}


def _models_key(models: Mapping[str, str]) -> str:
    return json.dumps(dict(models), sort_keys=True)


def outbox_items_of_job(audit: Audit, job_id: int) -> list[int]:
    """The outbox items an earlier attempt of ``job_id`` created."""
    with audit.session() as session:
        return [
            int(i)
            for i in session.scalars(
                select(OutboxItem.id).where(OutboxItem.job_id == job_id).order_by(OutboxItem.id)
            )
        ]


def previous_report(settings: Settings, audit: Audit, job: JobRecord) -> Dataset | None:
    """The SR of the latest earlier successful job of the same study, if it is still kept.

    A study that receives late images gets a new job; its SR supersedes that one. The SR
    is read from ``DATA_DIR/results/<study>/`` (the outbox copy is deleted once sent).
    """
    if job.study_instance_uid is None:
        return None
    latest = (
        select(JobStateChange.job_id)
        .join(Job, Job.id == JobStateChange.job_id)
        .where(
            Job.study_instance_uid == job.study_instance_uid,
            Job.kind == str(JobKind.ANALYSE),
            Job.id < job.job_id,
            JobStateChange.state == str(JobState.SUCCEEDED),
        )
        .order_by(JobStateChange.job_id.desc())
        .limit(1)
    )
    with audit.session() as session:
        previous = session.scalar(latest)
        if previous is None:
            return None
        sr_uid = session.scalar(
            select(OutboxItem.sop_instance_uid)
            .where(OutboxItem.job_id == previous, OutboxItem.sop_class_uid == COMPREHENSIVE_SR)
            .limit(1)
        )
    folder = settings.results_dir / study_folder(job.study_instance_uid)
    if sr_uid is not None:
        candidates = [folder / f"SR-{sr_uid}.dcm"]
    else:  # no destinations: the newest SR kept for the study
        candidates = sorted(folder.glob("SR-*.dcm"), key=lambda p: p.stat().st_mtime)[::-1]
    for path in candidates:
        if path.is_file():
            return dcmread(path)
    log.warning("the SR of job %s is no longer kept; the new SR names no predecessor", previous)
    return None


def study_folder(study_instance_uid: str) -> str:
    """The folder name ``worker.outbox`` keeps a study's result files under."""
    safe = "".join(c for c in study_instance_uid if c.isdigit() or c == ".").strip(".")
    return safe or "unknown-study"
