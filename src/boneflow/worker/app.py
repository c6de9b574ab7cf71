"""The Celery app of boneflow, built from :class:`Settings`: queues, reliability, broker.

Production uses ``BROKER_URL`` (Redis); an empty ``BROKER_URL`` selects the embedded
file-system broker under ``DATA_DIR/broker`` (see :mod:`boneflow.worker.embedded`). No
result backend: job outcomes live in the audit database.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from celery import Celery
from kombu import Exchange, Queue

from boneflow.config import Settings
from boneflow.db.audit import Audit

log = logging.getLogger(__name__)

ANALYSIS_QUEUE = "analysis"
DISPATCH_QUEUE = "dispatch"
QUEUES: tuple[str, ...] = (ANALYSIS_QUEUE, DISPATCH_QUEUE)
ANALYSE_TASK = "boneflow.analyse_study"
SEND_TASK = "boneflow.send_result"

# A job that was started this many times without finishing is FAILED (it may kill its
# worker every time: a poison image). Retries after transient errors count as attempts.
MAX_ANALYSIS_ATTEMPTS = 5
ANALYSIS_SOFT_TIME_LIMIT_SECONDS = 300
ANALYSIS_HARD_TIME_LIMIT_SECONDS = 360


@dataclass
class Runtime:
    """What a worker process opens once and keeps: the audit database connection."""

    pid: int
    audit: Audit


class BoneflowCelery(Celery):
    """A Celery app that carries its :class:`Settings` and a per-process :class:`Runtime`."""

    def __init__(self, settings: Settings) -> None:
        super().__init__("boneflow", set_as_current=False)
        self.settings = settings
        self._runtime: Runtime | None = None
        self._runtime_lock = threading.Lock()

    def audit(self) -> Audit:
        """The audit connection of this process (re-opened after a fork)."""
        with self._runtime_lock:
            runtime = self._runtime
            if runtime is None or runtime.pid != os.getpid():
                if runtime is not None:  # inherited over fork: the parent still uses it
                    runtime.audit.engine.dispose(close=False)
                runtime = Runtime(os.getpid(), Audit.open(self.settings.resolved_database_url))
                self._runtime = runtime
            return runtime.audit

    def close_runtime(self) -> None:
        """Close this process' audit connection, if open."""
        with self._runtime_lock:
            if self._runtime is not None and self._runtime.pid == os.getpid():
                self._runtime.audit.close()
            self._runtime = None


def create_app(settings: Settings) -> BoneflowCelery:
    """The Celery app for ``settings``, with boneflow's tasks registered."""
    from boneflow.worker.tasks import register_tasks

    app = BoneflowCelery(settings)
    exchange = Exchange("boneflow", type="direct")
    app.conf.update(
        task_queues=[Queue(name, exchange, routing_key=name) for name in QUEUES],
        task_default_queue=ANALYSIS_QUEUE,
        task_default_exchange="boneflow",
        task_default_routing_key=ANALYSIS_QUEUE,
        task_routes={
            ANALYSE_TASK: {"queue": ANALYSIS_QUEUE, "routing_key": ANALYSIS_QUEUE},
            SEND_TASK: {"queue": DISPATCH_QUEUE, "routing_key": DISPATCH_QUEUE},
        },
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # At-least-once: acknowledge after the task ran, requeue if the worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": None,
            "interval_start": 0.5,
            "interval_step": 1.0,
            "interval_max": 10.0,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=True,
        task_send_sent_event=False,
        enable_utc=True,
    )
    if settings.broker_url:
        # The database re-queues unfinished work on start; the visibility timeout is only
        # the broker's own last resort for messages of a worker that never came back.
        app.conf.update(
            broker_url=settings.broker_url,
            broker_transport_options={"visibility_timeout": 3600},
        )
    else:
        from boneflow.worker.embedded import transport_options

        app.conf.update(
            broker_url="filesystem://localhost/",
            broker_transport="boneflow.worker.embedded:Transport",
            broker_transport_options=transport_options(settings.data_dir),
        )
    register_tasks(app)
    return app


def broker_description(settings: Settings) -> str:
    """The broker for display, without a password."""
    if not settings.broker_url:
        return f"embedded ({(settings.data_dir / 'broker').resolve()})"
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(settings.broker_url))
