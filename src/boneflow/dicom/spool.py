"""The spool: received instances on disk exactly as received, and the STORED audit rows.

Layout: ``<DATA_DIR>/spool/<study>/<series>/<sop>.dcm``, names built from validated UIDs
only. A received file (pynetdicom's chunked temporary file, preamble + file meta + the
dataset bytes as the peer sent them) is fsync'd and hard-linked into place, so a reader
never sees a partial file. Whether an instance is new is decided under a per-SOP file lock
shared by every listener process on the machine, against the audit log: an instance is a
duplicate when the audit log already has a STORED row for its SOP Instance UID. A file in
the spool without such a row (the process died between fsync and audit) counts as new.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from boneflow.config import Settings
from boneflow.db.audit import Audit, InstanceStatus
from boneflow.db.schema import Instance
from boneflow.dicom.security import (
    InstanceHeader,
    is_valid_uid,
    raw_text,
    spool_relative_path,
)
from boneflow.fsio import fsync_path

log = logging.getLogger(__name__)

INCOMING = ".incoming"
_LOCKS = ".locks"
_LOCK_SHARDS = 64
RECOVERED_REASON = "recovered after restart"


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """An instance safely in the spool and audited as STORED."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    transfer_syntax: str
    path: Path
    size_bytes: int
    instance_id: int | None


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    """What :meth:`Spool.store_file` did: the instance, and whether it was new."""

    instance: StoredInstance
    is_new: bool


class Spool:
    """Writes received instances under ``root`` and records them in the audit log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming_dir = root / INCOMING
        self._locks_dir = root / _LOCKS
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        self._locks_dir.mkdir(parents=True, exist_ok=True)

    def path_for(self, header: InstanceHeader) -> Path:
        """Where an instance lives in the spool (validated UIDs only)."""
        return self.root / spool_relative_path(header)

    def store_file(
        self,
        received: Path,
        header: InstanceHeader,
        transfer_syntax: str,
        audit: Audit,
        *,
        association_id: int | None = None,
        started: float | None = None,
        synced: Callable[[], object] | None = None,
    ) -> StoreOutcome:
        """Put a received file in the spool (fsync + atomic link) and audit it.

        Args:
            received: the complete file as received (pynetdicom's chunked temporary file);
                it is left in place for the caller to delete.
            header: its validated header.
            transfer_syntax: the transfer syntax it was received in.
            audit: the audit log (STORED or DUPLICATE row appended here).
            association_id: the audit id of the association it came on.
            started: ``time.monotonic()`` when receiving finished, for ``elapsed_ms``.
            synced: waits for an fsync of ``received`` the caller already started (and
                raises what it raised); None: the file is fsync'd here.

        Returns:
            The instance and whether it is new (False: a duplicate, acknowledged and not
            to be analysed again).
        """
        target = self.path_for(header)
        size = received.stat().st_size
        if synced is None:
            fsync_path(received)
        with self._locked(header.sop_instance_uid):
            existing = stored_instance_id(audit, header.sop_instance_uid)
            if existing is not None:
                row = _record(
                    audit,
                    InstanceStatus.DUPLICATE,
                    header,
                    transfer_syntax,
                    size,
                    target,
                    association_id=association_id,
                    reason=f"already stored as audit row {existing}",
                    elapsed_ms=_elapsed_ms(started),
                )
                return StoreOutcome(_instance(header, transfer_syntax, target, size, row), False)
            if synced is not None:
                synced()  # the data is on disk before its name is
            self._link_into_place(received, target)
            row = _record(
                audit,
                InstanceStatus.STORED,
                header,
                transfer_syntax,
                size,
                target,
                association_id=association_id,
                elapsed_ms=_elapsed_ms(started),
            )
        return StoreOutcome(_instance(header, transfer_syntax, target, size, row), True)

    def spooled_files(self) -> Iterator[Path]:
        """Every ``<study>/<series>/<sop>.dcm`` in the spool, skipping work folders."""
        for study in sorted(self.root.iterdir()):
            if study.name.startswith(".") or not study.is_dir():
                continue
            for series in sorted(study.iterdir()):
                if series.is_dir():
                    yield from sorted(series.glob("*.dcm"))

    def remove_stale_incoming(self, older_than_seconds: float) -> int:
        """Delete partial receptions abandoned by dead associations; returns how many."""
        removed = 0
        cutoff = time.time() - older_than_seconds
        for path in self.incoming_dir.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # finished or removed by its listener meanwhile
        return removed

    @contextmanager
    def _locked(self, sop_instance_uid: str) -> Iterator[None]:
        """An exclusive lock shared by all processes and threads for this SOP's shard."""
        shard = zlib.crc32(sop_instance_uid.encode()) % _LOCK_SHARDS
        fd = os.open(self._locks_dir / f"{shard:02d}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _link_into_place(self, received: Path, target: Path) -> None:
        created = _make_dirs(target.parent)
        source = received
        if received.stat().st_dev != target.parent.stat().st_dev:
            source = self.incoming_dir / f"{uuid.uuid4().hex}.part"  # other file system
            shutil.copyfile(received, source)
            fsync_path(source)
        try:
            try:
                os.link(source, target)  # atomic create-if-absent
            except FileExistsError:
                # A file without a STORED row: left by a process killed before auditing.
                part = target.with_name(f".{uuid.uuid4().hex}.part")
                os.link(source, part)
                os.replace(part, target)
        finally:
            if source != received:
                source.unlink(missing_ok=True)
        fsync_path(target.parent)
        for folder in created:
            fsync_path(folder.parent)


def recover_spool(settings: Settings, audit: Audit) -> list[StoredInstance]:
    """Record spooled files that have no STORED audit row and return them.

    Such a file was fsync'd and linked, then the process died before auditing (the peer
    got no success and may resend; the resend is then a duplicate). Each is recorded as
    STORED with reason ``"recovered after restart"`` so that it is analysed.
    """
    spool = Spool(settings.spool_dir)
    stale = spool.remove_stale_incoming(max(2 * settings.network_timeout_seconds, 120.0))
    if stale:
        log.info("removed %d abandoned partial receptions", stale)
    with audit.session() as session:
        known = set(
            session.scalars(
                select(Instance.sop_instance_uid).where(
                    Instance.status == str(InstanceStatus.STORED)
                )
            )
        )
    recovered: list[StoredInstance] = []
    for path in spool.spooled_files():
        if path.stem in known:
            continue
        found = _recover_one(spool, audit, path)
        if found is not None:
            recovered.append(found)
    if recovered:
        log.warning("recovered %d spooled instances after restart", len(recovered))
    return recovered


def stored_instance_id(audit: Audit, sop_instance_uid: str) -> int | None:
    """The audit id of the STORED row of this SOP Instance UID, if any (a plain read)."""
    return audit.stored_instance_id(sop_instance_uid)


def _recover_one(spool: Spool, audit: Audit, path: Path) -> StoredInstance | None:
    sop_uid = path.stem
    if not is_valid_uid(sop_uid):
        log.warning("ignoring spool file with a non-UID name: %s", path.name)
        return None
    try:
        ds = dcmread(path, stop_before_pixels=True)
        header = InstanceHeader(
            sop_instance_uid=raw_text(ds, "SOPInstanceUID"),
            sop_class_uid=raw_text(ds, "SOPClassUID"),
            study_instance_uid=raw_text(ds, "StudyInstanceUID"),
            series_instance_uid=raw_text(ds, "SeriesInstanceUID"),
            patient_id=raw_text(ds, "PatientID"),
            rows=0,
            columns=0,
            frames=0,
        )
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop the others
        log.error("cannot recover spool file %s: %s", path, exc)
        audit.instance_received(
            status=InstanceStatus.FAILED,
            sop_instance_uid=sop_uid,
            spool_path=str(path),
            reason=f"unreadable after restart: {exc}",
        )
        return None
    if header.sop_instance_uid != sop_uid or spool.path_for(header) != path:
        log.warning("spool file %s does not match its UIDs; left alone", path)
        return None
    size = path.stat().st_size
    with spool._locked(sop_uid):  # a listener may be storing the same SOP right now
        if stored_instance_id(audit, sop_uid) is not None:
            return None
        row = _record(
            audit,
            InstanceStatus.STORED,
            header,
            transfer_syntax,
            size,
            path,
            reason=RECOVERED_REASON,
        )
    return _instance(header, transfer_syntax, path, size, row)


def _record(
    audit: Audit,
    status: InstanceStatus,
    header: InstanceHeader,
    transfer_syntax: str,
    size: int,
    path: Path,
    *,
    association_id: int | None = None,
    reason: str | None = None,
    elapsed_ms: float | None = None,
) -> int:
    return audit.instance_received(
        status=status,
        association_id=association_id,
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        study_instance_uid=header.study_instance_uid,
        series_instance_uid=header.series_instance_uid,
        patient_id=header.patient_id,
        transfer_syntax=transfer_syntax,
        size_bytes=size,
        spool_path=str(path),
        reason=reason,
        elapsed_ms=elapsed_ms,
    )


def _instance(
    header: InstanceHeader, transfer_syntax: str, path: Path, size: int, row: int | None
) -> StoredInstance:
    return StoredInstance(
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        study_instance_uid=header.study_instance_uid,
        series_instance_uid=header.series_instance_uid,
        patient_id=header.patient_id,
        transfer_syntax=transfer_syntax,
        path=path,
        size_bytes=size,
        instance_id=row,
    )


def _elapsed_ms(started: float | None) -> float | None:
    return None if started is None else (time.monotonic() - started) * 1000.0


def _make_dirs(folder: Path) -> list[Path]:
    """``mkdir -p`` that returns the folders it created (to fsync their parents)."""
    missing: list[Path] = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing
