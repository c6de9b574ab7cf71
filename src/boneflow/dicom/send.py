"""C-STORE and C-ECHO to other nodes: ``boneflow send``/``echo`` and the results dispatcher.

Files are sent as they are on disk (pynetdicom reads them in chunks; nothing is decoded
or re-encoded), under presentation contexts built from what is actually sent: each SOP
class with the transfer syntax of its files plus the little-endian syntaxes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context
from pynetdicom.transport import AssociationSocket
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from boneflow.config import Destination, Settings
from boneflow.dicom.security import client_tls_context
from boneflow.dicom.sockets import close_socket
from boneflow.errors import DestinationUnavailable

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
SOP_CLASS_NOT_SUPPORTED = 0x0122  # no presentation context was accepted for it
NOT_SENT = 0xFFFF  # the association ended before this item was sent
_MAX_CONTEXTS = 128


@dataclass(frozen=True, slots=True)
class _Item:
    """One thing to send: a file or a dataset, with its SOP class and transfer syntax."""

    source: Path | Dataset
    sop_class_uid: str
    transfer_syntax: str


def store_datasets(
    destination: Destination,
    items: Sequence[Path | Dataset],
    settings: Settings,
    calling_ae_title: str | None = None,
    on_status: Callable[[int, int], None] | None = None,
) -> list[int]:
    """C-STORE each item over one association (more when >128 contexts are needed).

    Args:
        destination: a DIMSE destination (``AET@HOST:PORT``).
        items: DICOM files (sent as on disk) or datasets (encoded in their transfer syntax).
        settings: timeouts, TLS files and our AE title.
        calling_ae_title: our AE title; defaults to ``settings.ae_title``.
        on_status: called with (index, status) as soon as each item's C-STORE is answered,
            so that a caller can record each object before the association ends.

    Returns:
        One C-STORE status per item, in order (0x0000 success, 0xBxxx warning,
        0x0122 when the peer accepted no context for its SOP class).

    Raises:
        DestinationUnavailable: the peer cannot be reached, refuses the association or
            drops it midway.
    """
    described = [_describe(item) for item in items]
    statuses = [NOT_SENT] * len(described)
    for batch in _batches(described):
        for index, status in _store_batch(
            destination, described, batch, settings, calling_ae_title or settings.ae_title
        ):
            statuses[index] = status
            if on_status is not None:
                on_status(index, status)
    return statuses


def send_command(
    settings: Settings,
    paths: Sequence[Path],
    destination: Destination,
    calling_ae_title: str | None = None,
) -> int:
    """``boneflow send``: C-STORE files and folders (recursive) with a progress bar.

    Returns:
        0 when every file was stored (success or warning), 1 otherwise.
    """
    console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
    files, failed, ignored = _collect(paths)
    counts: Counter[str] = Counter()
    if failed:
        counts["unreadable"] = len(failed)
    if ignored:
        counts["non-DICOM ignored"] = ignored
    started = time.monotonic()
    with Progress(
        TextColumn("sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=not sys.stderr.isatty(),
    ) as progress:
        task = progress.add_task("send", total=len(files))
        for start in range(0, len(files), 64):
            chunk = files[start : start + 64]
            try:
                statuses = store_datasets(destination, chunk, settings, calling_ae_title)
            except DestinationUnavailable as exc:
                console.print(f"boneflow: {destination}: {exc}")
                statuses = [NOT_SENT] * len(chunk)
            for path, status in zip(chunk, statuses, strict=True):
                label = _status_label(status)
                counts[label] += 1
                if label not in {"success", "warning"}:
                    failed.append((path, f"0x{status:04X} {label}"))
            progress.advance(task, len(chunk))
    elapsed = time.monotonic() - started
    for path, why in failed:
        console.print(f"failed {path}: {why}")
    summary = ", ".join(f"{count} {label}" for label, count in sorted(counts.items()))
    print(f"{len(files)} files to {destination} in {elapsed:.1f} s: {summary or 'nothing sent'}")
    return 1 if failed else 0


def echo_command(
    settings: Settings, destination: Destination, calling_ae_title: str | None = None
) -> int:
    """``boneflow echo``: C-ECHO a node; prints the status and round-trip time."""
    ae = _make_ae(settings, calling_ae_title or settings.ae_title)
    ae.add_requested_context(VERIFICATION)
    started = time.monotonic()
    try:
        assoc = _associate(ae, destination, settings)
    except DestinationUnavailable as exc:
        print(f"boneflow: echo {destination}: {exc}", file=sys.stderr)
        return 1
    raw_socket = assoc.dul.socket.socket
    try:
        response = assoc.send_c_echo()
    finally:
        try:
            assoc.release()
        finally:  # even when the release fails: no socket is left open
            if raw_socket is not None:
                raw_socket.close()
    status = int(response.Status) if "Status" in response else None
    elapsed_ms = (time.monotonic() - started) * 1000
    if status != 0:
        shown = "no response" if status is None else f"status 0x{status:04X}"
        print(f"boneflow: echo {destination}: {shown}", file=sys.stderr)
        return 1
    print(f"echo {destination}: success in {elapsed_ms:.0f} ms")
    return 0


# ---- helpers ---------------------------------------------------------------------------


def _store_batch(
    destination: Destination,
    items: list[_Item],
    batch: list[int],
    settings: Settings,
    calling_ae_title: str,
) -> Iterator[tuple[int, int]]:
    ae = _make_ae(settings, calling_ae_title)
    for context in _contexts([items[i] for i in batch]):
        ae.add_requested_context(context.abstract_syntax, context.transfer_syntax)
    assoc = _associate(ae, destination, settings)
    raw_socket = assoc.dul.socket.socket  # pynetdicom may drop it unclosed on a reset
    try:
        for index in batch:
            item = items[index]
            if not _has_context(assoc, item):
                yield index, SOP_CLASS_NOT_SUPPORTED
                continue
            response = assoc.send_c_store(item.source)
            if not assoc.is_established or "Status" not in response:
                raise DestinationUnavailable(f"{destination} dropped the association")
            yield index, int(response.Status)
    finally:
        try:
            if assoc.is_established:
                assoc.release()
        finally:  # even when the release fails: no socket is left open
            if raw_socket is not None:
                raw_socket.close()  # idempotent


def _make_ae(settings: Settings, calling_ae_title: str) -> Any:
    _config.STORE_SEND_CHUNKED_DATASET = True  # files go out in chunks, never fully loaded
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = settings.acse_timeout_seconds
    ae.dimse_timeout = settings.dimse_timeout_seconds
    ae.network_timeout = settings.network_timeout_seconds
    ae.maximum_pdu_size = settings.max_pdu_bytes
    return ae


def _associate(ae: Any, destination: Destination, settings: Settings) -> Any:
    if destination.kind != "dimse":
        raise DestinationUnavailable(f"{destination} is not a DIMSE destination")
    tls = client_tls_context(settings)
    kwargs: dict[str, Any] = {"ae_title": destination.ae_title}
    if tls is not None:
        kwargs["tls_args"] = (tls, destination.host)
    try:
        assoc = ae.associate(destination.host, destination.port, **kwargs)
    except OSError as exc:
        raise DestinationUnavailable(f"cannot reach {destination}: {exc}") from exc
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        why = (
            f"result {primitive.result}, source {primitive.result_source}, "
            f"reason {primitive.diagnostic}"
            if primitive is not None
            else "no reason"
        )
        raise DestinationUnavailable(f"{destination} rejected the association ({why})")
    raise DestinationUnavailable(f"cannot associate with {destination} (aborted or timed out)")


def _close_sockets_of_failed_connects() -> None:
    """Make pynetdicom close the socket of a TCP or TLS connect that fails.

    ``AssociationSocket.connect`` sets its socket to None without closing it when the peer
    refuses the connection or the TLS handshake fails (e.g. an untrusted server
    certificate), leaking a descriptor per failed attempt and a ResourceWarning. With TLS
    the descriptor belongs to the ``SSLSocket`` that ``wrap_socket`` made (the plain socket
    is detached), so the wrapper also records what the TLS context wraps and closes it.
    Its ``_shutdown_socket`` (used by ``close()`` too) closes only when ``shutdown()``
    succeeds, so a connection the peer reset after the handshake leaked the same way;
    the replacement always closes. Installed once, idempotent, when this module is
    imported (so every pynetdicom requestor in the process gets it).
    """
    original = AssociationSocket.connect
    if getattr(original, "_boneflow", False):
        return

    def connect(self: AssociationSocket, primitive: Any) -> None:
        raw = self.socket
        tls_args = self.tls_args
        wrapped: list[Any] = []
        if tls_args is not None:
            self.tls_args = (_RecordingContext(tls_args[0], wrapped), tls_args[1])  # type: ignore[assignment]
        try:
            original(self, primitive)
        finally:
            self.tls_args = tls_args
            if self.socket is None:
                for made in (raw, *wrapped):
                    if made is not None:
                        made.close()

    def shutdown_socket(self: AssociationSocket) -> None:
        close_socket(self.socket)

    connect._boneflow = True  # type: ignore[attr-defined]
    AssociationSocket.connect = connect  # type: ignore[method-assign]
    AssociationSocket._shutdown_socket = shutdown_socket  # type: ignore[method-assign]


class _RecordingContext:
    """An ``ssl.SSLContext`` stand-in for one connect: wraps as the context does, records."""

    def __init__(self, context: Any, wrapped: list[Any]) -> None:
        self._context = context
        self._wrapped = wrapped

    def wrap_socket(self, sock: Any, **kwargs: Any) -> Any:
        made = self._context.wrap_socket(sock, **kwargs)
        self._wrapped.append(made)
        return made


def _describe(item: Path | Dataset) -> _Item:
    if isinstance(item, Dataset):
        meta = getattr(item, "file_meta", None)
        syntax = str(meta.TransferSyntaxUID) if meta and "TransferSyntaxUID" in meta else ""
        return _Item(item, str(item.SOPClassUID), syntax or EXPLICIT_LE)
    meta = read_file_meta_info(item)
    return _Item(item, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))


def _contexts(items: list[_Item]) -> list[Any]:
    """One context per (SOP class, transfer syntax) sent, so each is accepted on its own."""
    pairs = dict.fromkeys((item.sop_class_uid, item.transfer_syntax) for item in items)
    return [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]


def _batches(items: list[_Item]) -> Iterator[list[int]]:
    """Indices of items, grouped so that no association needs more than 128 contexts."""
    batch: list[int] = []
    pairs: set[tuple[str, str]] = set()
    for index, item in enumerate(items):
        pair = (item.sop_class_uid, item.transfer_syntax)
        if pair not in pairs and len(pairs) == _MAX_CONTEXTS:
            yield batch
            batch, pairs = [], set()
        pairs.add(pair)
        batch.append(index)
    if batch:
        yield batch


def _has_context(assoc: Any, item: _Item) -> bool:
    return any(
        context.abstract_syntax == item.sop_class_uid
        and str(context.transfer_syntax[0]) == item.transfer_syntax
        for context in assoc.accepted_contexts
    )


def _collect(paths: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, str]], int]:
    """DICOM files under ``paths``: (files, failures, how many non-DICOM files were ignored).

    A path named on the command line that is missing or not DICOM is a failure; other
    files met while walking a folder (READMEs, DICOMDIR viewers) are only counted.
    """
    files: list[Path] = []
    failures: list[tuple[Path, str]] = []
    ignored = 0
    for root in paths:
        if not root.exists():
            failures.append((root, "does not exist"))
            continue
        walked = root.is_dir()
        candidates = sorted(p for p in root.rglob("*") if p.is_file()) if walked else [root]
        for path in candidates:
            try:
                meta = read_file_meta_info(path)
                if "MediaStorageSOPClassUID" not in meta or "TransferSyntaxUID" not in meta:
                    raise InvalidDicomError("no file meta information")
            except (InvalidDicomError, OSError, ValueError) as exc:
                if walked:
                    ignored += 1
                else:
                    failures.append((path, f"not a DICOM file ({exc})"))
                continue
            files.append(path)
    return files, failures, ignored


def _status_label(status: int) -> str:
    if status == 0x0000:
        return "success"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    if status == NOT_SENT:
        return "not sent"
    if status == SOP_CLASS_NOT_SUPPORTED:
        return "SOP class not accepted"
    if 0xA700 <= status <= 0xA7FF:
        return "out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return "dataset does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return "cannot understand"
    return "failure"


_close_sockets_of_failed_connects()  # see its docstring: pynetdicom leaks failed sockets
