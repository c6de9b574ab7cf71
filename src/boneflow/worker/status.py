"""``boneflow status``: queues, workers, in-flight and failed jobs, outbox.

Everything but the queue depths and the workers seen comes from the audit database;
the broker is asked with short timeouts so that a broker that is down is reported, not
waited for.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

from kombu import Connection
from kombu.exceptions import ChannelError, KombuError
from sqlalchemy import func, select

from boneflow.config import Settings
from boneflow.db.audit import Audit, JobState
from boneflow.db.schema import Job, JobStateChange
from boneflow.worker.app import QUEUES, broker_description
from boneflow.worker.outbox import outbox_summary

log = logging.getLogger(__name__)

PING_TIMEOUT_SECONDS = 1.0
FAILED_SHOWN = 10


@dataclass(frozen=True, slots=True)
class FailedJob:
    """A job whose current state is FAILED."""

    job_id: int
    kind: str
    study_instance_uid: str | None
    attempt: int
    detail: str | None
    failed_at: str


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """What ``boneflow status`` reports."""

    broker: str
    broker_reachable: bool
    queue_depths: dict[str, int] = field(default_factory=dict)
    workers: list[str] = field(default_factory=list)
    jobs: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    failed: list[FailedJob] = field(default_factory=list)
    outbox: dict[str, int] = field(default_factory=dict)


def status_command(settings: Settings, as_json: bool) -> int:
    """Print the node's status; exit 0, or 1 when the broker or database is unreachable."""
    from boneflow.db.migrate import upgrade

    upgrade(settings.resolved_database_url)
    audit = Audit.open(settings.resolved_database_url)
    try:
        status = collect_status(settings, audit)
    finally:
        audit.close()
    if as_json:
        print(json.dumps(asdict(status), indent=2, sort_keys=True))
    else:
        print(render(status))
    return 0 if status.broker_reachable else 1


def collect_status(settings: Settings, audit: Audit, ping: bool = True) -> NodeStatus:
    """Gather the status from the database and (briefly) the broker."""
    depths = queue_depths(settings)
    workers = workers_seen(settings) if ping and depths is not None else []
    counts = audit.job_state_counts()
    jobs = {str(state): counts.get(str(state), 0) for state in JobState}
    return NodeStatus(
        broker=broker_description(settings),
        broker_reachable=depths is not None,
        queue_depths=depths or {},
        workers=workers,
        jobs=jobs,
        in_flight=jobs[str(JobState.RUNNING)] + jobs[str(JobState.RETRYING)],
        failed=failed_jobs(audit),
        outbox=outbox_summary(audit),
    )


def queue_depths(settings: Settings) -> dict[str, int] | None:
    """Messages waiting per queue; None when the broker cannot be reached."""
    if not settings.broker_url:
        from boneflow.worker.embedded import queue_depth

        return {queue: queue_depth(settings.data_dir, queue) for queue in QUEUES}
    options = {"socket_timeout": 2, "socket_connect_timeout": 2, "max_retries": 0}
    try:
        with Connection(
            settings.broker_url, connect_timeout=2, transport_options=options
        ) as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
            channel = connection.default_channel
            depths = {}
            for queue in QUEUES:
                try:
                    depths[queue] = int(channel.queue_declare(queue=queue, passive=True)[1])  # type: ignore[attr-defined]
                except ChannelError:  # never declared: nothing was ever queued there
                    depths[queue] = 0
            return depths
    except (KombuError, ChannelError, OSError) as exc:
        log.warning("broker %s unreachable: %s", broker_description(settings), exc)
        return None


def workers_seen(settings: Settings, timeout_seconds: float = PING_TIMEOUT_SECONDS) -> list[str]:
    """Worker names that answered a ping within ``timeout_seconds``."""
    from boneflow.worker.app import create_app

    app = create_app(settings)
    try:
        replies = app.control.ping(timeout=timeout_seconds) or []
    except (KombuError, OSError) as exc:
        log.warning("cannot ping workers: %s", exc)
        return []
    finally:
        app.close()
    return sorted(name for reply in replies for name in reply)


def failed_jobs(audit: Audit, limit: int = FAILED_SHOWN) -> list[FailedJob]:
    """The latest jobs whose current state is FAILED."""
    latest = (
        select(JobStateChange.job_id, func.max(JobStateChange.id).label("last_id"))
        .group_by(JobStateChange.job_id)
        .subquery()
    )
    query = (
        select(Job.id, Job.kind, Job.study_instance_uid, JobStateChange)
        .join(latest, latest.c.job_id == Job.id)
        .join(JobStateChange, JobStateChange.id == latest.c.last_id)
        .where(JobStateChange.state == str(JobState.FAILED))
        .order_by(JobStateChange.id.desc())
        .limit(limit)
    )
    with audit.session() as session:
        return [
            FailedJob(
                job_id=int(job_id),
                kind=str(kind),
                study_instance_uid=study,
                attempt=int(change.attempt),
                detail=change.detail,
                failed_at=change.recorded_at.isoformat(timespec="seconds"),
            )
            for job_id, kind, study, change in session.execute(query)
        ]


def render(status: NodeStatus) -> str:
    """The status as a few lines of text."""
    reach = "reachable" if status.broker_reachable else "UNREACHABLE"
    lines = [f"broker      {status.broker} ({reach})"]
    lines.append(
        "queues      " + ", ".join(f"{q} {n}" for q, n in status.queue_depths.items())
        if status.queue_depths
        else "queues      unknown"
    )
    lines.append(
        f"workers     {len(status.workers)} seen"
        + (": " + ", ".join(status.workers) if status.workers else "")
    )
    lines.append("jobs        " + ", ".join(f"{s} {n}" for s, n in status.jobs.items()))
    lines.append(f"in flight   {status.in_flight}")
    lines.append("outbox      " + ", ".join(f"{k} {v}" for k, v in status.outbox.items()))
    if status.failed:
        lines.append(f"failed jobs (latest {len(status.failed)}):")
        for job in status.failed:
            lines.append(
                f"  job {job.job_id} {job.kind} study {job.study_instance_uid or '-'} "
                f"attempt {job.attempt} at {job.failed_at}: {job.detail or ''}"
            )
    return "\n".join(lines)
