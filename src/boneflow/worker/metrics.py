"""Prometheus ``/metrics`` for listener and worker processes.

Counts come from the audit database at scrape time, so every process reports the same
truth however many processes there are: images received by status (stored, duplicate,
refused, failed), jobs by current state, send attempts by status (dispatch failures),
unsent outbox items, broker queue depths. Latency histograms are read incrementally from
the database too: per analysis stage (the ``timings_ms`` of each result) and from a
study's settle moment (its job created) to the job's success.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import func, select

from boneflow.config import Settings
from boneflow.db.audit import Audit, JobState
from boneflow.db.schema import DispatchAttempt, Instance, Job, JobStateChange, Result

log = logging.getLogger(__name__)

STAGE_BUCKETS_SECONDS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
JOB_BUCKETS_SECONDS: tuple[float, ...] = (
    0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0,
)  # fmt: skip


class QueueSource(Protocol):
    """Something that can tell queue depths (the Celery app)."""

    settings: Settings

    def audit(self) -> Audit: ...


class MetricsServer:
    """A running ``/metrics`` endpoint."""

    def __init__(self, server: WSGIServer, thread: threading.Thread, port: int) -> None:
        self._server = server
        self._thread = thread
        self.port = port

    def shutdown(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


def start_metrics_server(
    settings: Settings, app: QueueSource, audit: Audit | None = None
) -> MetricsServer | None:
    """Serve ``/metrics`` on ``settings.metrics_port`` (0 = off) in a daemon thread.

    A port that is taken is logged, not fatal: metrics must never stop a node.
    """
    if not settings.metrics_port:
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BoneflowCollector(settings, audit or app.audit()))
    try:
        server, thread = start_http_server(
            settings.metrics_port, addr=settings.host, registry=registry
        )
    except OSError as exc:
        log.warning("cannot serve /metrics on port %d: %s", settings.metrics_port, exc)
        return None
    port = int(server.server_address[1])
    log.info("serving /metrics on %s:%d", settings.host, port)
    return MetricsServer(server, thread, port)


class BoneflowCollector:
    """A Prometheus collector that reads the audit database at scrape time."""

    def __init__(self, settings: Settings, audit: Audit) -> None:
        self.settings = settings
        self.audit = audit
        self._lock = threading.Lock()
        self._stages = _Histograms(STAGE_BUCKETS_SECONDS)
        self._jobs = _Histograms(JOB_BUCKETS_SECONDS)
        self._last_result_id = 0
        self._last_state_id = 0

    def describe(self) -> list[Metric]:
        """Nothing up front (the metrics depend on the database)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The metrics, read now."""
        up = GaugeMetricFamily("boneflow_database_up", "1 when the audit database answered")
        try:
            with self._lock:
                families = list(self._collect_database())
        except Exception:  # a scrape must never fail because the database is away
            log.exception("metrics: cannot read the audit database")
            up.add_metric([], 0.0)
            yield up
        else:
            up.add_metric([], 1.0)
            yield up
            yield from families
        yield from _queue_metrics(self.settings)

    def _collect_database(self) -> Iterator[Metric]:
        images = CounterMetricFamily(
            "boneflow_images_received", "Instances received, by status", labels=["status"]
        )
        jobs = GaugeMetricFamily("boneflow_jobs", "Jobs by current state", labels=["state"])
        dispatch = CounterMetricFamily(
            "boneflow_dispatch_attempts", "Send attempts to destinations", labels=["status"]
        )
        with self.audit.session() as session:
            for status, count in session.execute(
                select(Instance.status, func.count()).group_by(Instance.status)
            ):
                images.add_metric([str(status)], float(count))
            for status, count in session.execute(
                select(DispatchAttempt.status, func.count()).group_by(DispatchAttempt.status)
            ):
                dispatch.add_metric([str(status)], float(count))
            self._read_stage_timings(session)
            self._read_job_latencies(session)
        counts = self.audit.job_state_counts()
        for state in JobState:
            jobs.add_metric([str(state)], float(counts.get(str(state), 0)))
        failures = CounterMetricFamily(
            "boneflow_dispatch_failures", "Send attempts that failed (retried or given up)"
        )
        failed = sum(v for s, v in _samples(dispatch) if s in ("failed", "gave_up"))
        failures.add_metric([], failed)
        yield images
        yield jobs
        yield dispatch
        yield failures
        yield self._stages.family(
            "boneflow_analysis_stage_seconds", "Time per analysis stage, per image", "stage"
        )
        yield self._jobs.family(
            "boneflow_settle_to_done_seconds",
            "From a study's settle moment (job created) to its job succeeding",
            "kind",
        )

    def _read_stage_timings(self, session: object) -> None:
        rows = session.execute(  # type: ignore[attr-defined]
            select(Result.id, Result.timings_ms)
            .where(Result.id > self._last_result_id)
            .order_by(Result.id)
        ).all()
        for result_id, timings in rows:
            self._last_result_id = int(result_id)
            try:
                stages = json.loads(timings or "{}")
            except ValueError:
                continue
            for stage, ms in stages.items():
                if isinstance(ms, int | float):
                    self._stages.observe(str(stage), float(ms) / 1000.0)

    def _read_job_latencies(self, session: object) -> None:
        rows = session.execute(  # type: ignore[attr-defined]
            select(JobStateChange.id, Job.kind, Job.recorded_at, JobStateChange.recorded_at)
            .join(Job, Job.id == JobStateChange.job_id)
            .where(
                JobStateChange.id > self._last_state_id,
                JobStateChange.state == str(JobState.SUCCEEDED),
            )
            .order_by(JobStateChange.id)
        ).all()
        for state_id, kind, created, done in rows:
            self._last_state_id = int(state_id)
            self._jobs.observe(str(kind), (_utc(done) - _utc(created)).total_seconds())


class _Histograms:
    """Cumulative histograms by one label, kept in memory."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def observe(self, label: str, value: float) -> None:
        counts = self._counts.setdefault(label, [0] * (len(self.buckets) + 1))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1
        self._sums[label] = self._sums.get(label, 0.0) + value

    def family(self, name: str, documentation: str, label: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=[label])
        for value, counts in sorted(self._counts.items()):
            buckets = [(repr(b), float(c)) for b, c in zip(self.buckets, counts, strict=False)]
            buckets.append(("+Inf", float(counts[-1])))
            family.add_metric([value], buckets, self._sums[value])
        return family


def _queue_metrics(settings: Settings) -> Iterator[Metric]:
    from boneflow.worker.status import queue_depths

    depth = GaugeMetricFamily("boneflow_queue_depth", "Messages waiting", labels=["queue"])
    up = GaugeMetricFamily("boneflow_broker_up", "1 when the broker answered")
    depths = queue_depths(settings)
    up.add_metric([], 0.0 if depths is None else 1.0)
    for queue, count in (depths or {}).items():
        depth.add_metric([queue], float(count))
    yield up
    yield depth


def _samples(family: Metric) -> Iterator[tuple[str, float]]:
    for sample in family.samples:
        yield sample.labels.get("status", ""), float(sample.value)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
