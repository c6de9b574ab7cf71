"""The long-running commands: ``serve`` (one machine), ``listen`` and ``worker``.

``listen`` runs the DICOM listener with its settle loop and ``/metrics``; jobs go to the
broker. ``worker`` runs a Celery worker. ``serve`` runs both as one process tree on the
embedded broker (or ``BROKER_URL`` if set): the listener in the main process and two
worker processes, one for analysis (prefork, models kept in memory) and one for dispatch
(threads). A worker process that dies is started again. SIGTERM or SIGINT shut the tree
down cleanly: the listener stops accepting, workers finish or hand back their tasks.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType

from sqlalchemy.exc import OperationalError

from boneflow.config import Settings
from boneflow.db.audit import Audit
from boneflow.db.migrate import upgrade
from boneflow.dicom.spool import StoredInstance
from boneflow.errors import BoneflowError
from boneflow.logs import configure_logging
from boneflow.worker import metrics
from boneflow.worker.app import (
    ANALYSE_TASK,
    ANALYSIS_QUEUE,
    DISPATCH_QUEUE,
    QUEUES,
    SEND_TASK,
    BoneflowCelery,
    broker_description,
    create_app,
)
from boneflow.worker.settle import SettleLoop, lost_jobs, unsent_outbox_items
from boneflow.worker.status import queue_depths

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 30.0
DATABASE_WAIT_SECONDS = 300.0
DISPATCH_THREADS = 4


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One worker process of ``serve``."""

    name: str
    queues: tuple[str, ...]
    concurrency: int
    pool: str


SERVE_WORKERS: tuple[WorkerSpec, ...] = (
    WorkerSpec("analysis", (ANALYSIS_QUEUE,), 1, "prefork"),
    WorkerSpec("dispatch", (DISPATCH_QUEUE,), DISPATCH_THREADS, "threads"),
)


def listen(settings: Settings) -> int:
    """Run the listener, its settle loop and ``/metrics`` until SIGTERM or SIGINT."""
    prepare(settings)
    stop = _stop_on_signals()
    node = Node(settings, create_app(settings))
    node.start()
    try:
        stop.wait()
    finally:
        node.stop()
    return 0


def serve(settings: Settings) -> int:
    """Run listener and workers on one machine until SIGTERM or SIGINT."""
    prepare(settings)
    if not settings.broker_url:
        from boneflow.worker.embedded import clear_control_state, restore_claimed

        restored = restore_claimed(settings.data_dir)
        if restored:
            log.info("embedded broker: %d claimed messages put back", restored)
        clear_control_state(settings.data_dir, QUEUES)
    stop = _stop_on_signals()
    context = multiprocessing.get_context("spawn")
    children: dict[str, BaseProcess] = {}
    node = Node(settings, create_app(settings))
    try:
        for spec in SERVE_WORKERS:
            children[spec.name] = _spawn(context, settings, spec)
        node.start()
        log.info(
            "boneflow serving %s on %s:%d, broker %s",
            settings.ae_title,
            settings.host,
            node.port,
            broker_description(settings),
        )
        while not stop.wait(1.0):
            for spec in SERVE_WORKERS:
                child = children[spec.name]
                if not child.is_alive():
                    log.error("%s worker exited (%s); starting it again", spec.name, child.exitcode)
                    children[spec.name] = _spawn(context, settings, spec)
    finally:
        node.stop()
        _stop_children(list(children.values()))
    return 0


def run_worker(
    settings: Settings,
    queues: Sequence[str],
    concurrency: int,
    pool: str | None = None,
    recover: bool = True,
) -> int:
    """Run a Celery worker for ``queues`` until SIGTERM or SIGINT; returns its exit code.

    Args:
        settings: the node's settings.
        queues: ``analysis`` and/or ``dispatch``.
        concurrency: worker processes (prefork) or threads (dispatch only).
        pool: ``prefork``, ``threads`` or ``solo``; default prefork, threads for a
            dispatch-only worker.
        recover: queue again, before consuming, the unfinished work of these queues that
            no live process holds (after a crash of the whole worker).
    """
    unknown = sorted(set(queues) - set(QUEUES))
    if unknown or not queues:
        raise SystemExit(f"boneflow: --queues: expected some of {', '.join(QUEUES)}")
    prepare(settings)
    app = create_app(settings)
    if recover:
        _recover_queues(settings, app, queues)
    server = metrics.start_metrics_server(settings, app)
    pool = pool or ("threads" if list(queues) == [DISPATCH_QUEUE] else "prefork")
    worker = app.Worker(
        hostname=f"{'+'.join(queues)}.{_pid()}@{socket.gethostname()}",
        queues=list(queues),
        concurrency=max(1, concurrency),
        pool=pool,
        optimization="fair",
        without_mingle=True,
        without_gossip=True,
        loglevel=settings.log_level,
        quiet=settings.log_json,  # the banner only with plain logs
    )
    try:
        worker.start()
    finally:
        if server is not None:
            server.shutdown()
        app.close_runtime()
    return int(worker.exitcode or 0)


def prepare(settings: Settings, wait_seconds: float = DATABASE_WAIT_SECONDS) -> None:
    """Create DATA_DIR's folders and bring the database schema up to date.

    A database that does not answer yet (it is starting too) is waited for.

    Raises:
        BoneflowError: the database did not answer within ``wait_seconds``.
    """
    for folder in (settings.data_dir, settings.spool_dir, settings.outbox_dir):
        folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            upgrade(settings.resolved_database_url)
            return
        except OperationalError as exc:
            if time.monotonic() > deadline:
                raise BoneflowError(f"the database does not answer: {exc.orig}") from None
            log.warning("waiting for the database (%s)", exc.orig)
            time.sleep(2.0)


class Node:
    """The listener side of a node: DICOM listener, settle loop, ``/metrics``."""

    def __init__(self, settings: Settings, app: BoneflowCelery) -> None:
        self.settings = settings
        self.app = app
        self.audit = Audit.open(settings.resolved_database_url)
        self.settle = SettleLoop(
            settings,
            self.audit,
            enqueue_analysis=lambda job_id: _publish(app, ANALYSE_TASK, job_id),
            enqueue_dispatch=lambda item_id: _publish(app, SEND_TASK, item_id),
            queue_depths=lambda: queue_depths(settings),
        )
        self._listener: object | None = None
        self._metrics: metrics.MetricsServer | None = None
        self.port = settings.port

    def start(self) -> None:
        """Recover, then start the settle loop, the listener and ``/metrics``."""
        from boneflow.dicom.listener import start_listener
        from boneflow.dicom.spool import recover_spool

        recovered = recover_spool(self.settings, self.audit)
        if recovered:
            log.info("spool recovery: %d instances recorded", len(recovered))
        self.settle.recover()
        self.settle.start()

        try:
            listener = start_listener(self.settings, self.audit, note_stored)
        except OSError as exc:
            self.settle.stop()
            where = f"{self.settings.host}:{self.settings.port}"
            raise BoneflowError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        self._listener = listener
        self.port = int(listener.port)
        self._metrics = metrics.start_metrics_server(self.settings, self.app, self.audit)

    def stop(self) -> None:
        """Stop accepting, then stop the settle loop and ``/metrics``."""
        listener = self._listener
        if listener is not None:
            listener.stop()  # type: ignore[attr-defined]
            self._listener = None
        self.settle.stop()
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics = None
        self.audit.close()


def note_stored(instance: StoredInstance) -> None:
    """The listener's ``on_stored``: log it; the settle loop finds it in the database.

    A module-level function, so that several listener processes can share it.
    """
    log.debug("stored %s of study %s", instance.sop_instance_uid, instance.study_instance_uid)


def _publish(app: BoneflowCelery, task_name: str, identifier: int) -> None:
    app.tasks[task_name].apply_async(
        (identifier,), retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2}
    )


def _recover_queues(settings: Settings, app: BoneflowCelery, queues: Sequence[str]) -> None:
    audit = app.audit()
    jobs: list[int] = []
    if ANALYSIS_QUEUE in queues:
        depths = queue_depths(settings) or {}
        empty = depths.get(ANALYSIS_QUEUE, 1) == 0
        jobs = lost_jobs(settings, audit, empty, queued_grace_seconds=0.0)
    items = unsent_outbox_items(audit) if DISPATCH_QUEUE in queues else []
    for job_id in jobs:
        _publish(app, ANALYSE_TASK, job_id)
    for item_id in items:
        _publish(app, SEND_TASK, item_id)
    if jobs or items:
        log.info("worker start: queued again %d jobs and %d outbox items", len(jobs), len(items))


def _spawn(
    context: multiprocessing.context.SpawnContext, settings: Settings, spec: WorkerSpec
) -> BaseProcess:
    process = context.Process(
        target=_worker_main, args=(settings, spec), name=f"boneflow-{spec.name}", daemon=False
    )
    process.start()
    return process


def _worker_main(settings: Settings, spec: WorkerSpec) -> None:
    configure_logging(settings.log_level, settings.log_json)
    if ANALYSIS_QUEUE in spec.queues:
        # Leave one CPU to the listener and the dispatcher on the same machine.
        os.environ.setdefault("OMP_NUM_THREADS", str(analysis_threads()))
    no_metrics = dataclasses.replace(settings, metrics_port=0)
    raise SystemExit(
        run_worker(no_metrics, spec.queues, spec.concurrency, pool=spec.pool, recover=False)
    )


def analysis_threads() -> int:
    """Torch threads of ``serve``'s analysis worker: the CPUs of this process less one."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return max(1, (available or os.cpu_count() or 1) - 1)


def _stop_children(children: list[BaseProcess]) -> None:
    for child in children:
        if child.is_alive():
            child.terminate()  # SIGTERM: Celery's warm shutdown
    deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            log.warning("%s did not stop in time; killing it", child.name)
            child.kill()
            child.join(5.0)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _pid() -> int:
    return os.getpid()
