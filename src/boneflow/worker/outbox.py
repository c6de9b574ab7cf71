"""The persistent outbox: result files plus audit rows, one item per object and destination.

An item is final once an attempt is SENT or GAVE_UP; every attempt is one audit row, so
the outbox's state is always the audit log's. Files live under ``DATA_DIR/outbox`` until
every item that points at them is final; a copy of every result stays in
``DATA_DIR/results`` for people to look at.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select

from boneflow.config import Destination, Settings, parse_node
from boneflow.db.audit import Audit, DispatchStatus
from boneflow.db.schema import DispatchAttempt, OutboxItem
from boneflow.dicom.results import (
    ResultObjects,
    file_name,
    to_bytes,
    write_heatmap_png,
    write_heatmap_pngs,
)
from boneflow.errors import ConfigError, DestinationRefused, DestinationUnavailable
from boneflow.fsio import fsync_path, write_atomically
from boneflow.worker.locks import try_file_lock

log = logging.getLogger(__name__)

BASE_DELAY_SECONDS = 5.0
MAX_DELAY_SECONDS = 600.0
FINAL_DISPATCH_STATES = frozenset({DispatchStatus.SENT, DispatchStatus.GAVE_UP})
_SUCCESS = 0x0000
PNG_NICE = 19  # the SC PNGs are written when the CPU has nothing better to do
SEND_BATCH = 32  # objects per association when many results wait for one destination


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """An outbox item that still has to reach its destination."""

    outbox_item_id: int
    destination: str
    study_instance_uid: str | None
    sop_instance_uid: str
    sop_class_uid: str
    path: str
    job_id: int | None
    created_at: datetime
    failed_attempts: int
    last_error: str | None


def enqueue_results(
    settings: Settings,
    audit: Audit,
    objects: ResultObjects,
    job_id: int | None,
    *,
    background_pngs: bool = False,
) -> list[int]:
    """Keep the result files and put one outbox item per object and destination.

    Files go to ``results/<study>/`` (with a PNG of each SC) and, when there are
    destinations, to ``outbox/<study>/``; both are written atomically before any item is
    recorded. Each object is encoded once; the outbox copy is a hard link to the kept
    file (a copy when the two folders are on different file systems). Calling it again
    with the same objects adds nothing.

    Args:
        settings: where DATA_DIR is and the destinations.
        audit: the audit log.
        objects: one study's SR and SCs.
        job_id: the job that produced them.
        background_pngs: write the SC PNGs (for people to look at) later, from the kept
            SC files, on a helper thread at the lowest CPU priority, so that they never
            delay results; see :func:`wait_for_pngs`. PNGs still pending when the
            process dies are not written (the SCs themselves are kept and sent).

    Returns:
        The outbox item ids (existing ones included), SCs before the SR of each destination.
    """
    study = objects.study_instance_uid
    kept = settings.results_dir / _folder_name(study)
    kept_paths = [write_atomically(kept / file_name(ds), to_bytes(ds)) for ds in objects.datasets]
    if background_pngs:
        captures = kept_paths[: len(objects.secondary_captures)]  # SCs come first
        _pngs_pending.append(_png_writer().submit(_write_pngs, captures, kept))
    else:
        write_heatmap_pngs(objects, kept)
    if not settings.destinations:
        log.info("study %s: results in %s; no destinations configured", study, kept)
        return []
    outbox = settings.outbox_dir / _folder_name(study)
    paths = [_link_atomically(path, outbox / path.name) for path in kept_paths]
    uids = [str(ds.SOPInstanceUID) for ds in objects.datasets]
    existing = _existing_items(audit, uids)
    ids: list[int] = []
    for destination in settings.destinations:
        for ds, path in zip(objects.datasets, paths, strict=True):
            key = (str(destination), str(ds.SOPInstanceUID))
            if key in existing:
                ids.append(existing[key])
                continue
            ids.append(
                audit.outbox_item_added(
                    destination=str(destination),
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    path=_stored_path(settings, path),
                    study_instance_uid=study,
                    job_id=job_id,
                )
            )
    log.info(
        "study %s: %d result objects to %d destinations",
        study,
        len(paths),
        len(settings.destinations),
    )
    return ids


def deliver_with_companions(
    settings: Settings, audit: Audit, outbox_item_id: int, limit: int = SEND_BATCH
) -> DispatchStatus:
    """:func:`deliver` one item, together with fresh items for the same DIMSE destination.

    Items never attempted yet that go to the same C-STORE destination (up to ``limit`` in
    all) ride on the same association; each is audited as soon as it is answered. Their
    own messages then find them SENT. Same return and errors as :func:`deliver` for
    ``outbox_item_id``.
    """
    item = _load_item(audit, outbox_item_id)
    try:
        dimse = parse_node(item.destination).kind == "dimse"
    except ConfigError:
        dimse = False
    companions = fresh_items(audit, item.destination, outbox_item_id, limit - 1) if dimse else []
    if not companions:
        return deliver(settings, audit, outbox_item_id)
    statuses = send_results(settings, audit, [outbox_item_id, *companions])
    status = statuses.get(outbox_item_id)
    if status is None:
        raise DestinationUnavailable(f"outbox item {outbox_item_id} is being sent elsewhere")
    if status is DispatchStatus.FAILED:
        raise DestinationUnavailable(f"outbox item {outbox_item_id} to {item.destination} failed")
    return status


def send_results(
    settings: Settings, audit: Audit, outbox_item_ids: Sequence[int]
) -> dict[int, DispatchStatus]:
    """Send outbox items with one association per C-STORE destination; audit each object.

    Each object's attempt is recorded (SENT, FAILED or GAVE_UP) as soon as the destination
    answers it, so a crash midway loses no SENT row. Items already final keep their
    status; items another process is sending are left out of the result.

    Returns:
        The status of each item this call took, by outbox item id.
    """
    statuses: dict[int, DispatchStatus] = {}
    with ExitStack() as locks:
        by_destination: dict[str, list[OutboxItem]] = {}
        for item_id in outbox_item_ids:
            path = settings.outbox_dir / ".locks" / f"item-{item_id}.lock"
            if not locks.enter_context(try_file_lock(path)):
                continue
            item = _load_item(audit, item_id)
            final = _final_status(audit, item_id)
            if final is not None:
                statuses[item_id] = final
                continue
            by_destination.setdefault(item.destination, []).append(item)
        for destination, items in by_destination.items():
            statuses.update(_send_to(settings, audit, destination, items))
    for item_id, status in statuses.items():
        if status in FINAL_DISPATCH_STATES:
            (settings.outbox_dir / ".locks" / f"item-{item_id}.lock").unlink(missing_ok=True)
    return statuses


def fresh_items(audit: Audit, destination: str, exclude: int, limit: int) -> list[int]:
    """Outbox items for ``destination`` with no send attempt yet, oldest first."""
    if limit <= 0:
        return []
    with audit.session() as session:
        return [
            int(i)
            for i in session.scalars(
                select(OutboxItem.id)
                .where(
                    OutboxItem.destination == destination,
                    OutboxItem.id != exclude,
                    OutboxItem.id.not_in(select(DispatchAttempt.outbox_item_id)),
                )
                .order_by(OutboxItem.id)
                .limit(limit)
            )
        ]


def wait_for_pngs(timeout_seconds: float | None = None) -> None:
    """Wait until the PNGs handed to the helper thread are written."""
    while _pngs_pending:
        _pngs_pending.pop().result(timeout_seconds)


def deliver(settings: Settings, audit: Audit, outbox_item_id: int) -> DispatchStatus:
    """Make one attempt to send an outbox item; audit it.

    A no-op returning the final status when the item was already SENT or GAVE_UP. A failed
    attempt of an item older than ``OUTBOX_MAX_AGE_SECONDS`` gives up (GAVE_UP, audited,
    logged as an error); so does an item whose file or destination can never work.

    Raises:
        DestinationUnavailable: this attempt failed and a later one may succeed (the
            destination is down, or refused the object and has not yet run out of time).
        LookupError: there is no such outbox item.
    """
    item = _load_item(audit, outbox_item_id)
    with _item_lock(settings, outbox_item_id) as held:
        if not held:  # a redelivered message while the first is still sending
            raise DestinationUnavailable(f"outbox item {outbox_item_id} is being sent elsewhere")
        return _attempt(settings, audit, item)


def _attempt(settings: Settings, audit: Audit, item: OutboxItem) -> DispatchStatus:
    """One attempt, under the item's lock."""
    outbox_item_id = item.id
    final = _final_status(audit, outbox_item_id)  # read under the lock
    if final is not None:
        log.info("outbox item %s is already %s", outbox_item_id, final)
        return final
    started = time.monotonic()
    try:
        destination = parse_node(item.destination)
        path = _resolved_path(settings, item.path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        _send(settings, destination, path)
    except (ConfigError, FileNotFoundError, InvalidDicomError, ValueError) as exc:
        # Can never work: the file is gone or unreadable, the destination is malformed.
        error = f"cannot send: {exc}"
        return _give_up(audit, settings, item, error, _elapsed_ms(started))
    except (DestinationUnavailable, DestinationRefused, OSError) as exc:
        elapsed_ms = _elapsed_ms(started)
        age = _age_seconds(item.recorded_at)
        if age >= settings.outbox_max_age_seconds:
            error = f"{exc}; gave up after {age:.0f} s (OUTBOX_MAX_AGE_SECONDS)"
            return _give_up(audit, settings, item, error, elapsed_ms)
        audit.dispatch_attempted(
            outbox_item_id, DispatchStatus.FAILED, error=str(exc), elapsed_ms=elapsed_ms
        )
        log.warning("outbox item %s to %s failed: %s", outbox_item_id, item.destination, exc)
        raise DestinationUnavailable(str(exc)) from exc
    audit.dispatch_attempted(outbox_item_id, DispatchStatus.SENT, elapsed_ms=_elapsed_ms(started))
    log.info(
        "sent %s to %s (outbox item %s)", item.sop_instance_uid, item.destination, outbox_item_id
    )
    _remove_file_when_done(settings, audit, item.path)
    return DispatchStatus.SENT


def pending_items(audit: Audit) -> list[OutboxEntry]:
    """Outbox items that are neither SENT nor GAVE_UP, oldest first."""
    final = select(DispatchAttempt.outbox_item_id).where(
        DispatchAttempt.status.in_([str(s) for s in FINAL_DISPATCH_STATES])
    )
    failures = (
        select(
            DispatchAttempt.outbox_item_id,
            func.count(DispatchAttempt.id).label("failed"),
            func.max(DispatchAttempt.id).label("last_id"),
        )
        .where(DispatchAttempt.status == str(DispatchStatus.FAILED))
        .group_by(DispatchAttempt.outbox_item_id)
        .subquery()
    )
    query = (
        select(OutboxItem, failures.c.failed, DispatchAttempt.error)
        .outerjoin(failures, failures.c.outbox_item_id == OutboxItem.id)
        .outerjoin(DispatchAttempt, DispatchAttempt.id == failures.c.last_id)
        .where(OutboxItem.id.not_in(final))
        .order_by(OutboxItem.id)
    )
    with audit.session() as session:
        return [
            OutboxEntry(
                outbox_item_id=item.id,
                destination=item.destination,
                study_instance_uid=item.study_instance_uid,
                sop_instance_uid=item.sop_instance_uid,
                sop_class_uid=item.sop_class_uid,
                path=item.path,
                job_id=item.job_id,
                created_at=_utc(item.recorded_at),
                failed_attempts=int(failed or 0),
                last_error=error,
            )
            for item, failed, error in session.execute(query)
        ]


def outbox_summary(audit: Audit) -> dict[str, int]:
    """Counts for ``boneflow status``.

    Keys: ``items``, ``sent``, ``gave_up``, ``pending``, ``failed_attempts`` (of items
    still pending) and ``oldest_pending_seconds`` (0 when nothing is pending).
    """
    with audit.session() as session:
        total = int(session.scalar(select(func.count(OutboxItem.id))) or 0)
        finals = dict(
            session.execute(
                select(
                    DispatchAttempt.status,
                    func.count(func.distinct(DispatchAttempt.outbox_item_id)),
                )
                .where(DispatchAttempt.status.in_([str(s) for s in FINAL_DISPATCH_STATES]))
                .group_by(DispatchAttempt.status)
            ).all()
        )
    pending = pending_items(audit)
    oldest = min((entry.created_at for entry in pending), default=None)
    return {
        "items": total,
        "sent": int(finals.get(str(DispatchStatus.SENT), 0)),
        "gave_up": int(finals.get(str(DispatchStatus.GAVE_UP), 0)),
        "pending": len(pending),
        "failed_attempts": sum(entry.failed_attempts for entry in pending),
        "oldest_pending_seconds": int(_age_seconds(oldest)) if oldest is not None else 0,
    }


def next_delay_seconds(
    attempt: int,
    base_seconds: float = BASE_DELAY_SECONDS,
    max_seconds: float = MAX_DELAY_SECONDS,
    rng: random.Random | None = None,
) -> float:
    """Exponential back-off with jitter before attempt ``attempt + 1`` (attempt >= 0).

    The ceiling doubles with each attempt up to ``max_seconds``; the delay is drawn
    uniformly from its upper half, so retries of many items spread out without any
    retry coming much sooner than the schedule.
    """
    ceiling = min(max_seconds, base_seconds * 2.0 ** min(max(attempt, 0), 32))
    return (rng or random).uniform(ceiling / 2.0, ceiling)


_png_executor: ThreadPoolExecutor | None = None
_pngs_pending: list[Future[None]] = []


def _png_writer() -> ThreadPoolExecutor:
    global _png_executor
    if _png_executor is None:
        _png_executor = ThreadPoolExecutor(
            1, thread_name_prefix="boneflow-png", initializer=_lowest_priority
        )
    done = [f for f in _pngs_pending if f.done()]
    for future in done:
        _pngs_pending.remove(future)
    return _png_executor


def _lowest_priority() -> None:
    """Nice this thread (Linux: per thread) so that PNGs only use CPU nobody else wants."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PNG_NICE)
    except (OSError, AttributeError) as exc:  # not Linux, or not allowed: full priority
        log.debug("PNG thread keeps its priority: %s", exc)


def _write_pngs(captures: list[Path], folder: Path) -> None:
    for path in captures:
        try:
            write_heatmap_png(dcmread(path), folder)
        except (OSError, ValueError, InvalidDicomError) as exc:  # a picture for people
            log.warning("cannot write the PNG of %s: %s", path.name, exc)


def _link_atomically(source: Path, target: Path) -> Path:
    """``target`` as a hard link to ``source`` (complete or absent), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".tmp-{uuid.uuid4().hex}{target.suffix}")
    try:
        os.link(source, temporary)
    except OSError:  # another file system, or links not supported
        return write_atomically(target, source.read_bytes())
    temporary.replace(target)
    fsync_path(target.parent)
    return target


def _send_to(
    settings: Settings, audit: Audit, destination: str, items: list[OutboxItem]
) -> dict[int, DispatchStatus]:
    """One association to ``destination`` for ``items`` (their locks held by the caller)."""
    statuses: dict[int, DispatchStatus] = {}
    try:
        node = parse_node(destination)
    except ConfigError as exc:
        for item in items:
            statuses[item.id] = _give_up(audit, settings, item, f"cannot send: {exc}", 0.0)
        return statuses
    if node.kind != "dimse":
        for item in items:
            try:
                statuses[item.id] = _attempt(settings, audit, item)
            except DestinationUnavailable:
                statuses[item.id] = DispatchStatus.FAILED
        return statuses
    sendable: list[tuple[OutboxItem, Path]] = []
    for item in items:
        path = _resolved_path(settings, item.path)
        if path.is_file():
            sendable.append((item, path))
        else:
            error = f"cannot send: {path} is missing"
            statuses[item.id] = _give_up(audit, settings, item, error, 0.0)
    started = [time.monotonic()]  # per object: since the previous answer

    def answered(index: int, status: int) -> None:
        item = sendable[index][0]
        elapsed_ms = _elapsed_ms(started[0])
        started[0] = time.monotonic()
        if status == _SUCCESS or 0xB000 <= status <= 0xBFFF:  # warnings are stored
            audit.dispatch_attempted(item.id, DispatchStatus.SENT, elapsed_ms=elapsed_ms)
            log.info("sent %s to %s (outbox item %s)", item.sop_instance_uid, destination, item.id)
            _remove_file_when_done(settings, audit, item.path)
            statuses[item.id] = DispatchStatus.SENT
            return
        error = f"{destination} answered C-STORE status 0x{status:04X}"
        statuses[item.id] = _failed(audit, settings, item, error, elapsed_ms)

    try:
        from boneflow.dicom.send import store_datasets

        store_datasets(node, [path for _, path in sendable], settings, on_status=answered)
    except (DestinationUnavailable, OSError) as exc:
        for item, _ in sendable:
            if item.id not in statuses:
                elapsed_ms = _elapsed_ms(started[0])
                statuses[item.id] = _failed(audit, settings, item, str(exc), elapsed_ms)
    return statuses


def _failed(
    audit: Audit, settings: Settings, item: OutboxItem, error: str, elapsed_ms: float
) -> DispatchStatus:
    """A failed attempt: FAILED, or GAVE_UP once the item is older than its maximum age."""
    age = _age_seconds(item.recorded_at)
    if age >= settings.outbox_max_age_seconds:
        error = f"{error}; gave up after {age:.0f} s (OUTBOX_MAX_AGE_SECONDS)"
        return _give_up(audit, settings, item, error, elapsed_ms)
    audit.dispatch_attempted(item.id, DispatchStatus.FAILED, error=error, elapsed_ms=elapsed_ms)
    log.warning("outbox item %s to %s failed: %s", item.id, item.destination, error)
    return DispatchStatus.FAILED


def _send(settings: Settings, destination: Destination, path: Path) -> None:
    if destination.kind == "dicomweb":
        from boneflow.dicom.stow import store_instances

        store_instances(destination, [dcmread(path)], settings)
        return
    from boneflow.dicom.send import store_datasets

    (status,) = store_datasets(destination, [path], settings)
    if status != _SUCCESS and not 0xB000 <= status <= 0xBFFF:  # warnings are stored
        raise DestinationRefused(f"{destination} answered C-STORE status 0x{status:04X}")


def _give_up(
    audit: Audit, settings: Settings, item: OutboxItem, error: str, elapsed_ms: float
) -> DispatchStatus:
    audit.dispatch_attempted(item.id, DispatchStatus.GAVE_UP, error=error, elapsed_ms=elapsed_ms)
    log.error(
        "gave up sending %s to %s (outbox item %s): %s",
        item.sop_instance_uid,
        item.destination,
        item.id,
        error,
    )
    _remove_file_when_done(settings, audit, item.path)
    return DispatchStatus.GAVE_UP


def _load_item(audit: Audit, outbox_item_id: int) -> OutboxItem:
    with audit.session() as session:
        item = session.get(OutboxItem, outbox_item_id)
    if item is None:
        raise LookupError(f"no outbox item {outbox_item_id}")
    return item


def _final_status(audit: Audit, outbox_item_id: int) -> DispatchStatus | None:
    with audit.session() as session:
        status = session.scalar(
            select(DispatchAttempt.status)
            .where(
                DispatchAttempt.outbox_item_id == outbox_item_id,
                DispatchAttempt.status.in_([str(s) for s in FINAL_DISPATCH_STATES]),
            )
            .order_by(DispatchAttempt.id)
            .limit(1)
        )
    return DispatchStatus(status) if status is not None else None


def _existing_items(audit: Audit, sop_instance_uids: list[str]) -> dict[tuple[str, str], int]:
    with audit.session() as session:
        rows = session.execute(
            select(OutboxItem.destination, OutboxItem.sop_instance_uid, OutboxItem.id).where(
                OutboxItem.sop_instance_uid.in_(sop_instance_uids)
            )
        ).all()
    return {(destination, uid): int(item_id) for destination, uid, item_id in rows}


def _remove_file_when_done(settings: Settings, audit: Audit, stored: str) -> None:
    """Delete an outbox file once every item that points at it is final."""
    final = select(DispatchAttempt.outbox_item_id).where(
        DispatchAttempt.status.in_([str(s) for s in FINAL_DISPATCH_STATES])
    )
    with audit.session() as session:
        waiting = session.scalar(
            select(func.count(OutboxItem.id)).where(
                OutboxItem.path == stored, OutboxItem.id.not_in(final)
            )
        )
    if waiting:
        return
    try:
        _resolved_path(settings, stored).unlink(missing_ok=True)
    except OSError as exc:  # a leftover file costs disk space only
        log.warning("cannot remove sent outbox file %s: %s", stored, exc)


def _stored_path(settings: Settings, path: Path) -> str:
    """Paths under DATA_DIR are stored relative to it, so the data directory can move."""
    try:
        return str(path.resolve().relative_to(settings.data_dir.resolve()))
    except ValueError:
        return str(path.resolve())


def _resolved_path(settings: Settings, stored: str) -> Path:
    path = Path(stored)
    return path if path.is_absolute() else settings.data_dir / path


def _folder_name(study_instance_uid: str) -> str:
    safe = "".join(c for c in study_instance_uid if c.isdigit() or c == ".").strip(".")
    return safe or "unknown-study"


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _age_seconds(moment: datetime) -> float:
    return (datetime.now(UTC) - _utc(moment)).total_seconds()


def _elapsed_ms(started: float) -> float:
    return (time.monotonic() - started) * 1000.0


@contextmanager
def _item_lock(settings: Settings, outbox_item_id: int) -> Iterator[bool]:
    """An ``flock`` on the item, so that two deliveries never send it at the same time.

    Like the job locks it vanishes with its process, so a killed sender leaves none held.
    The file is removed once the item is final; until then it stays, so that every
    process locks the same file.
    """
    path = settings.outbox_dir / ".locks" / f"item-{outbox_item_id}.lock"
    with try_file_lock(path) as held:
        if not held:
            yield False
            return
        yield True
        # A normal return means the item is final: a late process that still opens this
        # file reads the final status under its lock and does nothing.
        path.unlink(missing_ok=True)
