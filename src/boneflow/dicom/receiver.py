"""A small receiving node: a Storage SCP that writes every instance it receives to a folder.

It stands in for a PACS when none is at hand: ``boneflow demo`` sends its results here when
Orthanc is not installed, and tests use it as a destination they can read back. It keeps
no database; the folder is the record (``<study>/<series>/<sop>.dcm``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210

# Every transfer syntax pydicom can write back, so that nothing is refused at negotiation.
_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian (retired)
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
)


@dataclass(frozen=True, slots=True)
class ReceivedInstance:
    """One instance the receiver has written to disk."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    calling_ae_title: str
    path: Path


class Receiver:
    """A running receiving node; create it with :func:`start_receiver`."""

    def __init__(self, ae: AE, out_dir: Path, ae_title: str, host: str) -> None:
        self._ae = ae
        self.out_dir = out_dir
        self.ae_title = ae_title
        self.host = host
        self.port = 0
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._received: list[ReceivedInstance] = []

    @property
    def node(self) -> str:
        """``AET@HOST:PORT`` of this receiver, as the DESTINATIONS setting spells it."""
        return f"{self.ae_title}@{self.host}:{self.port}"

    def received(self) -> list[ReceivedInstance]:
        """Everything received so far, in order of arrival."""
        with self._lock:
            return list(self._received)

    def wait_for(self, count: int, timeout_seconds: float) -> list[ReceivedInstance]:
        """Wait until at least ``count`` instances have arrived or the time is up.

        Returns:
            What has arrived by then (possibly fewer than ``count``).
        """
        deadline = time.monotonic() + timeout_seconds
        with self._arrived:
            while len(self._received) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.wait(min(remaining, 0.5))
            return list(self._received)

    def stop(self) -> None:
        """Stop listening and close open associations."""
        self._ae.shutdown()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _on_c_store(self, event: Event) -> int:
        """Write one instance (fsync, then rename) and acknowledge it."""
        try:
            ds: Dataset = event.dataset
            ds.file_meta = event.file_meta
            study = str(ds.StudyInstanceUID)
            series = str(ds.SeriesInstanceUID)
            sop = str(ds.SOPInstanceUID)
        except Exception as exc:  # noqa: BLE001 - bad input must not stop the receiver
            log.warning("receiver: cannot read an incoming instance: %s", exc)
            return CANNOT_UNDERSTAND
        path = self.out_dir / _safe(study) / _safe(series) / f"{_safe(sop)}.dcm"
        try:
            _write(ds, path)
        except OSError as exc:
            log.error("receiver: cannot write %s: %s", sop, exc)
            return OUT_OF_RESOURCES
        item = ReceivedInstance(
            sop_instance_uid=sop,
            sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=study,
            series_instance_uid=series,
            modality=str(ds.get("Modality", "")),
            calling_ae_title=str(event.assoc.requestor.ae_title).strip(),
            path=path,
        )
        with self._arrived:
            self._received.append(item)
            self._arrived.notify_all()
        log.info("receiver: stored %s (%s) from %s", sop, item.modality, item.calling_ae_title)
        return SUCCESS


def start_receiver(
    out_dir: Path,
    *,
    ae_title: str = "RECEIVER",
    host: str = "127.0.0.1",
    port: int = 0,
    allowed_callers: Sequence[str] = (),
) -> Receiver:
    """Start a Storage SCP (and Verification SCP) in background threads.

    Args:
        out_dir: where received instances are written (created if missing).
        ae_title: our AE title; associations calling another title are rejected.
        host: the address to bind; keep the default loopback unless peers are remote.
        port: the port to bind; 0 picks a free one (see ``Receiver.port``).
        allowed_callers: calling AE titles to accept; empty accepts any.

    Returns:
        The running :class:`Receiver`; call ``stop()`` when done.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True
    if allowed_callers:
        ae.require_calling_aet = [title.strip() for title in allowed_callers]
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, _TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    receiver = Receiver(ae, out_dir, ae_title, host)
    server = ae.start_server(
        (host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, receiver._on_c_store)]
    )
    if server is None:  # pynetdicom returns the server when block=False
        raise RuntimeError("pynetdicom did not start a server")
    receiver.port = int(server.server_address[1])
    log.info("receiver %s on %s:%d writes to %s", ae_title, host, receiver.port, out_dir)
    return receiver


def _write(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with partial.open("wb") as handle:
        ds.save_as(handle, enforce_file_format=True)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


def _safe(uid: str) -> str:
    """A UID as a file name: UIDs are digits and dots, anything else is replaced."""
    text = str(UID(uid)).strip()
    return "".join(ch if ch.isdigit() or ch == "." else "_" for ch in text) or "unknown"
