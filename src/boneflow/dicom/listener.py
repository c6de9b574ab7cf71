"""The C-STORE listener a PACS forwards to: negotiation, limits, spooling, audit.

One listener process runs a pynetdicom server with a thread per association. Datasets are
received in chunks straight into ``<spool>/.incoming`` (never held in memory), their
header is checked without decoding pixels, and only after fsync, atomic link and the
STORED audit row is success returned and ``on_stored`` called (once per new instance).

With ``LISTENER_PROCESSES`` > 1, the parent binds and listens on the port and that many
spawned child processes accept from the one listening socket (one GIL each); a process
with more open associations than a sibling leaves new ones to it, so parallel senders
are spread evenly. Each association reads through the lean receive path of
:mod:`boneflow.dicom.acceptor` where the pynetdicom version allows, and once established
runs its data phase on its own thread alone (blocking reads, nothing polls). Each child
process opens its own audit connection and calls ``on_stored`` itself, so the callback
must then be picklable (a module-level function or a ``functools.partial`` of one) and
safe to run in several processes; the production hand-off (the settle loop) reads the
database, which every process writes.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.synchronize
import pickle
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from pydicom import dcmread
from pynetdicom import AE, _config, evt
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from boneflow.config import Settings
from boneflow.db.audit import Audit, InstanceStatus
from boneflow.dicom.acceptor import install_lean_receive
from boneflow.dicom.incoming import INCOMING_ATTRIBUTE, install_incoming_tempfiles
from boneflow.dicom.security import (
    DEFLATED,
    HeaderProblem,
    caller_allowed,
    check_header,
    check_inflated_size,
    server_tls_context,
)
from boneflow.dicom.sockets import close_socket
from boneflow.dicom.spool import Spool, StoredInstance
from boneflow.fsio import fsync_path

log = logging.getLogger(__name__)

OnStored = Callable[[StoredInstance], None]

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
)
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    DEFLATED,  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1 (Process 14, selection value 1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
)

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

_ASSOC_ID = "_boneflow_association_id"
_VIOLATION = "_boneflow_violation"
_CONTROL_MESSAGE_PDU_LIMIT = 1024 * 1024  # associate/release/abort PDUs are small
_DEFER_SECONDS = 0.2  # how long a busier listener process leaves a connection to others


class ListenerHandle:
    """A running listener (one process or several): its bound port, stop and wait."""

    def __init__(
        self,
        port: int,
        stop: Callable[[], None],
        wait: Callable[[float | None], bool],
    ) -> None:
        self.port = port
        self._stop = stop
        self._wait = wait

    def stop(self) -> None:
        """Stop accepting, let running associations finish briefly, then abort them."""
        self._stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the listener has stopped; False if ``timeout`` ran out first."""
        return self._wait(timeout)


def start_listener(settings: Settings, audit: Audit, on_stored: OnStored) -> ListenerHandle:
    """Start listening on ``settings.host``/``settings.port`` (0 = any free port).

    Args:
        settings: AE title, limits, timeouts, TLS, spool location, LISTENER_PROCESSES.
        audit: the audit log of this process; with LISTENER_PROCESSES > 1 it is not
            used: each child process opens its own from ``settings``.
        on_stored: called once per new instance, after fsync and the STORED audit row,
            on the association's thread. It must be quick; whatever it raises is caught,
            audited and logged, never passed to the peer. With LISTENER_PROCESSES > 1 it
            runs in the child processes and must be picklable.

    Returns:
        The handle; ``handle.port`` is the port actually bound.

    Raises:
        TypeError: LISTENER_PROCESSES > 1 and ``on_stored`` cannot be pickled.
    """
    if not settings.allowed_callers:
        log.warning("ALLOWED_CALLERS is empty: any calling AE title may store")
    if settings.listener_processes > 1:
        try:
            pickle.dumps(on_stored)
        except Exception as exc:  # a lambda or closure: say so before spawning anything
            raise TypeError(
                f"LISTENER_PROCESSES={settings.listener_processes} needs a picklable "
                f"on_stored (a module-level function), not {on_stored!r}: {exc}"
            ) from exc
        return _start_processes(settings, on_stored)
    server = _start_server(settings, audit, on_stored)
    return _handle_for(server)


# ---- one listener process ---------------------------------------------------------------


class _Ingest:
    """The event handlers of one listener process."""

    def __init__(self, settings: Settings, audit: Audit, on_stored: OnStored) -> None:
        self.settings = settings
        self.audit = audit
        self.on_stored = on_stored
        self.spool = Spool(settings.spool_dir)
        self._fsync_pool = ThreadPoolExecutor(
            max(2, settings.max_associations), thread_name_prefix="boneflow-fsync"
        )

    def close(self) -> None:
        """Let the fsync helper threads go (the listener has stopped)."""
        self._fsync_pool.shutdown(wait=False)

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_C_STORE, self.on_c_store),
            (evt.EVT_C_ECHO, self.on_c_echo),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
        ]

    def on_requested(self, event: Any) -> None:
        """Refuse callers not in ALLOWED_CALLERS with the standard reason (0x03)."""
        assoc = event.assoc
        setattr(assoc, INCOMING_ATTRIBUTE, self.spool.incoming_dir)
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        if caller_allowed(self.settings.allowed_callers, calling, str(assoc.requestor.address)):
            return
        self._audit_association(assoc, accepted=False, reason="calling AE title not allowed")
        log.warning("refused association from %s@%s", calling, assoc.requestor.address)
        assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, calling AE unknown
        assoc.kill()  # as pynetdicom does after its own rejections: waits for the RJ to go out

    def on_accepted(self, event: Any) -> None:
        setattr(event.assoc, _ASSOC_ID, self._audit_association(event.assoc, accepted=True))

    def on_rejected(self, event: Any) -> None:
        primitive = event.assoc.acceptor.primitive
        diagnostic = (primitive.result_source, primitive.diagnostic) if primitive else None
        reason = (
            "too many associations (MAX_ASSOCIATIONS)"
            if diagnostic == (0x03, 0x02)
            else f"rejected by negotiation {diagnostic}"
        )
        self._audit_association(event.assoc, accepted=False, reason=reason)

    def on_c_echo(self, event: Any) -> int:
        return SUCCESS

    def on_aborted(self, event: Any) -> None:
        violation = getattr(event.assoc.dul.socket, _VIOLATION, None)
        log.warning(
            "association from %s aborted%s",
            event.assoc.requestor.ae_title,
            f": {violation}" if violation else "",
        )

    def on_conn_close(self, event: Any) -> None:
        """Record a limit violation and delete a partial dataset left by a dead peer."""
        assoc = event.assoc
        message = getattr(assoc.dimse, "message", None)
        partial: IO[bytes] | None = getattr(message, "_data_set_file", None)
        if partial is not None:
            partial.close()
            Path(partial.name).unlink(missing_ok=True)
        violation = getattr(getattr(assoc.dul, "socket", None), _VIOLATION, None)
        if violation:
            self._record_failure(
                {"association_id": getattr(assoc, _ASSOC_ID, None), "sop_instance_uid": None},
                f"association aborted: {violation}",
                status=InstanceStatus.REFUSED,
            )

    def on_c_store(self, event: Any) -> int:
        """Store one instance; acknowledge only once it is on disk and audited."""
        started = time.monotonic()
        assoc_id = getattr(event.assoc, _ASSOC_ID, None)
        request = event.request
        transfer_syntax = str(event.context.transfer_syntax)
        fields: dict[str, Any] = {
            "association_id": assoc_id,
            "sop_instance_uid": str(request.AffectedSOPInstanceUID or "")[:64] or None,
            "sop_class_uid": str(request.AffectedSOPClassUID or "")[:64] or None,
            "transfer_syntax": transfer_syntax,
        }
        path = Path(event.dataset_path)
        synced = self._fsync_pool.submit(fsync_path, path)  # overlaps the header check
        try:
            return self._store(event, path, synced, fields, started)
        finally:
            with contextlib.suppress(Exception):  # refused: the file is deleted anyway
                synced.result()

    def _store(
        self,
        event: Any,
        path: Path,
        synced: Future[None],
        fields: dict[str, Any],
        started: float,
    ) -> int:
        request = event.request
        transfer_syntax = fields["transfer_syntax"]
        try:
            size = path.stat().st_size
            fields["size_bytes"] = size
            negotiated = str(event.context.abstract_syntax)
            if fields["sop_class_uid"] != negotiated:  # pynetdicom serves it regardless
                raise HeaderProblem(
                    SOP_CLASS_NOT_SUPPORTED,
                    f"SOP Class {fields['sop_class_uid']} sent on the presentation context "
                    f"negotiated for {negotiated}",
                )
            if shutil.disk_usage(self.spool.root).free < self.settings.min_free_bytes:
                raise HeaderProblem(OUT_OF_RESOURCES, "free disk below MIN_FREE_BYTES")
            if size > self.settings.max_instance_bytes + 64 * 1024:
                raise HeaderProblem(0xC001, "instance larger than MAX_INSTANCE_BYTES")
            if transfer_syntax == DEFLATED:
                check_inflated_size(path, self.settings.max_instance_bytes)
            try:
                ds = dcmread(path, defer_size=4096)
            except Exception as exc:  # any parse failure is the peer's bad dataset
                raise HeaderProblem(CANNOT_UNDERSTAND, f"cannot parse dataset: {exc}") from exc
            header = check_header(
                ds,
                affected_sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
                affected_sop_class_uid=str(request.AffectedSOPClassUID or ""),
                transfer_syntax=transfer_syntax,
                file_size_bytes=size,
                max_pixels=self.settings.max_pixels,
            )
        except HeaderProblem as problem:
            return self._refuse(fields, problem, started)
        except Exception as exc:  # the edge: never let a peer's input stop the listener
            log.exception("cannot check instance %s", fields["sop_instance_uid"])
            return self._refuse(fields, HeaderProblem(CANNOT_UNDERSTAND, str(exc)), started)
        try:
            outcome = self.spool.store_file(
                path,
                header,
                transfer_syntax,
                self.audit,
                association_id=fields["association_id"],
                started=started,
                synced=synced.result,
            )
        except Exception as exc:  # disk or database trouble: the peer must retry later
            log.exception("cannot spool instance %s", header.sop_instance_uid)
            self._record_failure(fields, f"not stored: {exc}", started)
            return OUT_OF_RESOURCES
        log.debug(
            "%s %s (%d bytes)",
            "stored" if outcome.is_new else "duplicate",
            header.sop_instance_uid,
            outcome.instance.size_bytes,
        )
        if outcome.is_new:
            self._hand_off(outcome.instance, fields, started)
        return SUCCESS

    def _hand_off(self, instance: StoredInstance, fields: dict[str, Any], started: float) -> None:
        try:
            self.on_stored(instance)
        except Exception as exc:  # the callback must never reach pynetdicom
            log.exception("on_stored failed for %s", instance.sop_instance_uid)
            self._record_failure(
                {**fields, "study_instance_uid": instance.study_instance_uid},
                f"stored, but the hand-off failed ({exc}); the settle loop finds it in the "
                "database",
                started,
            )

    def _refuse(self, fields: dict[str, Any], problem: HeaderProblem, started: float) -> int:
        log.warning("refused instance %s: %s", fields["sop_instance_uid"], problem.reason)
        try:
            self.audit.instance_received(
                status=InstanceStatus.REFUSED,
                reason=f"0x{problem.status:04X} {problem.reason}",
                elapsed_ms=(time.monotonic() - started) * 1000,
                **fields,
            )
        except Exception:  # the refusal stands even when the audit database is away
            log.exception("cannot audit the refusal of %s", fields["sop_instance_uid"])
        return problem.status

    def _record_failure(
        self,
        fields: dict[str, Any],
        reason: str,
        started: float | None = None,
        status: InstanceStatus = InstanceStatus.FAILED,
    ) -> None:
        elapsed_ms = None if started is None else (time.monotonic() - started) * 1000
        try:
            self.audit.instance_received(
                status=status, reason=reason, elapsed_ms=elapsed_ms, **fields
            )
        except Exception:  # already failing; logging is all that is left
            log.exception("cannot audit the failure of %s", fields["sop_instance_uid"])

    def _audit_association(
        self, assoc: Any, *, accepted: bool, reason: str | None = None
    ) -> int | None:
        """Append the association row; its id, or None when the audit log is away."""
        requestor = assoc.requestor
        primitive = requestor.primitive
        calling = str(primitive.calling_ae_title) if primitive else str(requestor.ae_title)
        called = str(primitive.called_ae_title) if primitive else self.settings.ae_title
        return self.audit_association(
            calling, called, str(requestor.address), int(requestor.port or 0), accepted, reason
        )

    def audit_association(
        self,
        calling_ae_title: str,
        called_ae_title: str,
        peer_address: str,
        peer_port: int,
        accepted: bool,
        reason: str | None,
    ) -> int | None:
        """Append an association row; a failing audit log is logged, never raised."""
        try:
            return self.audit.association_opened(
                calling_ae_title=calling_ae_title,
                called_ae_title=called_ae_title,
                peer_address=peer_address,
                peer_port=peer_port,
                accepted=accepted,
                reason=reason,
            )
        except Exception:  # instances of this association then fail with 0xA700
            log.exception("cannot audit the association from %s", calling_ae_title)
            return None


class _BoundedSocket(AssociationSocket):
    """An acceptor socket that bounds PDU and dataset sizes and never waits forever.

    pynetdicom reads whatever PDU length a peer declares; here a P-DATA PDU above the
    negotiated maximum, or a dataset above MAX_INSTANCE_BYTES, closes the connection.
    Reads use the network timeout, so a peer that stops mid-PDU is cut off.
    """

    def __init__(self, assoc: Any, client_socket: socket.socket, settings: Settings) -> None:
        super().__init__(assoc, client_socket=client_socket)
        client_socket.settimeout(settings.network_timeout_seconds or None)
        self._max_pdu = settings.max_pdu_bytes
        self._max_dataset = settings.max_instance_bytes
        self._pdu_type: int | None = None
        self._dataset_bytes = 0

    def recv(self, nr_bytes: int) -> bytearray:
        """pynetdicom's stock reader: the 6-byte PDU header, then the PDU body."""
        if self._pdu_type is None:  # the 6-byte PDU header
            data = self._recv_exactly(nr_bytes)
            if len(data) == 6:
                pdu_type, length = data[0], int.from_bytes(data[2:6], "big")
                self.check_pdu_header(pdu_type, length)
                self._pdu_type = pdu_type
            return data
        pdu_type, self._pdu_type = self._pdu_type, None
        data = self._recv_exactly(nr_bytes)
        if pdu_type == 0x04:
            self._count_dataset_bytes(data)
        return data

    def check_pdu_header(self, pdu_type: int, length: int) -> None:
        """Abort (ConnectionAbortedError) when a PDU is longer than we allow."""
        limit = self._max_pdu if pdu_type == 0x04 else _CONTROL_MESSAGE_PDU_LIMIT
        if length > limit:
            self._violate(f"PDU of {length} bytes exceeds the limit of {limit}")

    def count_fragment(self, control_header: int, nbytes: int) -> None:
        """Count one PDV fragment; abort when a dataset exceeds MAX_INSTANCE_BYTES."""
        if control_header & 0x01:  # command fragment: a new message starts
            self._dataset_bytes = 0
            return
        self._dataset_bytes += nbytes
        if self._dataset_bytes > self._max_dataset:
            self._violate(f"dataset exceeds MAX_INSTANCE_BYTES {self._max_dataset}")

    def _recv_exactly(self, nr_bytes: int) -> bytearray:
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        sock = self.socket
        if sock is None:
            return bytearray()
        while received < nr_bytes:
            count = sock.recv_into(view[received:], nr_bytes - received)
            if count == 0:
                del view
                return buffer[:received]
            received += count
        return buffer

    def _count_dataset_bytes(self, pdu: bytearray) -> None:
        offset = 0
        while offset + 6 <= len(pdu):
            item_length = int.from_bytes(pdu[offset : offset + 4], "big")
            self.count_fragment(pdu[offset + 5], item_length - 2)
            offset += 4 + item_length

    def _shutdown_socket(self) -> None:
        """Close even when shutdown fails (pynetdicom skips close() then, leaking it)."""
        close_socket(self.socket)

    def _violate(self, reason: str) -> None:
        setattr(self, _VIOLATION, reason)
        raise ConnectionAbortedError(reason)  # the DUL treats it as a closed connection


class _RequestHandler(RequestHandler):
    """Runs on the association's thread: TLS handshake with a deadline, bounded socket."""

    server: _Server

    def handle(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.settimeout(self.server.settings.acse_timeout_seconds or None)
                self.request.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                self.server.ingest.audit_association(
                    "",
                    self.server.settings.ae_title,
                    str(self.client_address[0]),
                    int(self.client_address[1]),
                    False,
                    f"TLS handshake failed: {exc}",
                )
                log.warning("TLS handshake with %s failed: %s", self.client_address[0], exc)
                self.server.shutdown_request(self.request)
                return
        super().handle()

    def _create_association(self) -> Any:
        """pynetdicom's acceptor set-up, with :class:`_BoundedSocket` as the socket."""
        from copy import deepcopy

        from pynetdicom.association import Association

        server = self.server
        ae = server.ae
        assoc = Association(ae, "acceptor")
        assoc._server = server
        assoc.name = f"AcceptorThread@{time.strftime('%Y%m%d%H%M%S')}"
        assoc.set_socket(_BoundedSocket(assoc, self.request, server.settings))
        assoc.acceptor.maximum_length = ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(server.contexts)
        assoc.requestor.address_info = self.remote
        bound: dict[Any, Any] = server._handlers
        for event, handlers in bound.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:
                    assoc.bind(event, handler, args)
        install_lean_receive(assoc)
        return assoc


class _Server(ThreadedAssociationServer):
    """The association server; TLS handshakes happen on each association's thread."""

    daemon_threads = True

    def __init__(
        self,
        ae: Any,
        settings: Settings,
        ingest: _Ingest,
        listening: socket.socket | None,
        siblings: _Siblings | None,
        **kwargs: Any,
    ) -> None:
        self.settings = settings
        self.ingest = ingest
        self.listening = listening
        self.siblings = siblings
        super().__init__(ae, request_handler=_RequestHandler, **kwargs)

    def server_bind(self) -> None:
        if self.listening is None:
            super().server_bind()
            return
        if self.socket is not None:
            self.socket.close()  # the unbound one socketserver made; the parent's is used
        self.socket = self.listening
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.listening is None:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, Any]:
        if self.socket is None:
            raise OSError("the listening socket is closed")
        if self.siblings is not None:
            self.siblings.defer_to_a_less_busy_one()  # BlockingIOError: leave it to them
        client, address = self.socket.accept()  # BlockingIOError: a sibling was faster
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        if self.siblings is not None:
            self.siblings.count(+1)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            if self.siblings is not None:
                self.siblings.count(-1)


class _Siblings:
    """Spreads associations evenly over the listener processes of one listening socket.

    Each process counts its open connections in a shared array. A process with more than
    the least busy sibling leaves a waiting connection to the others for up to
    :data:`_DEFER_SECONDS`, then takes it anyway (a sibling may be stuck). Without this,
    whichever process wakes first accepts, and four associations land 3 + 1 or 4 + 0 on
    two processes as often as 2 + 2.
    """

    def __init__(self, loads: Any, slot: int) -> None:
        self._loads = loads  # multiprocessing.Array("i", processes, lock=False)
        self._slot = slot
        self._lock = threading.Lock()
        self._deferring_since = 0.0
        self._last_deferral = 0.0

    def count(self, delta: int) -> None:
        with self._lock:  # only this process writes its slot
            self._loads[self._slot] += delta

    def defer_to_a_less_busy_one(self) -> None:
        loads = list(self._loads)
        if loads[self._slot] <= min(loads):
            return
        now = time.monotonic()
        if now - self._last_deferral > 0.01:  # a new waiting connection
            self._deferring_since = now
        self._last_deferral = now
        if now - self._deferring_since > _DEFER_SECONDS:
            return  # nobody else took it: take it
        time.sleep(0.001)  # the socket stays readable until someone accepts: do not spin
        raise BlockingIOError("left to a less busy listener process")


def _start_server(
    settings: Settings,
    audit: Audit,
    on_stored: OnStored,
    *,
    listening: socket.socket | None = None,
    siblings: _Siblings | None = None,
) -> _Server:
    install_incoming_tempfiles()
    _config.STORE_RECV_CHUNKED_DATASET = True
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_bytes
    ae.acse_timeout = settings.acse_timeout_seconds
    ae.dimse_timeout = settings.dimse_timeout_seconds
    ae.network_timeout = settings.network_timeout_seconds
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ingest = _Ingest(settings, audit, on_stored)
    server = _Server(
        ae,
        settings,
        ingest,
        listening,
        siblings,
        address=(settings.host, settings.port),
        ae_title=settings.ae_title,
        contexts=ae.supported_contexts,
        ssl_context=server_tls_context(settings),
        evt_handlers=ingest.handlers(),
    )
    thread = threading.Thread(target=server.serve_forever, name="boneflow-listener", daemon=True)
    thread.start()
    ae._servers.append(server)
    log.info(
        "listening as %s on %s:%d%s",
        settings.ae_title,
        settings.host,
        server.server_address[1],
        " (TLS)" if server.ssl_context else "",
    )
    return server


def _handle_for(server: _Server) -> ListenerHandle:
    stopped = threading.Event()

    def stop() -> None:
        if stopped.is_set():
            return
        server.shutdown()  # stops accepting and closes the listening socket
        deadline = time.monotonic() + 5.0
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in server.active_associations:
            assoc.abort()
        server.ingest.close()
        stopped.set()

    return ListenerHandle(int(server.server_address[1]), stop, stopped.wait)


# ---- several listener processes on one port ----------------------------------------------


def _start_processes(settings: Settings, on_stored: OnStored) -> ListenerHandle:
    context = multiprocessing.get_context("spawn")
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind((settings.host, settings.port))
    listening.listen(max(128, 4 * settings.max_associations))
    listening.setblocking(False)  # every child waits in select; the first to accept wins
    port = int(listening.getsockname()[1])
    child_settings = _replace_port(settings, port)
    stop_event = context.Event()
    loads = context.Array("i", settings.listener_processes, lock=False)
    processes: list[Any] = []
    try:
        for index in range(settings.listener_processes):
            ready = context.Event()
            process = context.Process(
                target=_child_main,
                args=(child_settings, listening, (loads, index), on_stored, ready, stop_event),
                name=f"boneflow-listener-{index}",
                daemon=False,
            )
            process.start()
            processes.append(process)
            if not ready.wait(60):
                raise RuntimeError(f"listener process {index} did not start")
    except BaseException:
        stop_event.set()
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
        listening.close()
        raise
    log.info("%d listener processes share port %d", len(processes), port)

    def stop() -> None:
        stop_event.set()
        for process in processes:
            process.join(15)
            if process.is_alive():
                process.terminate()
                process.join(5)
        listening.close()  # the port is free once every child has let go of it

    def wait(timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for process in processes:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            process.join(remaining)
            if process.is_alive():
                return False
        return True

    return ListenerHandle(port, stop, wait)


def _child_main(
    settings: Settings,
    listening: socket.socket,
    load_slot: tuple[Any, int],
    on_stored: OnStored,
    ready: multiprocessing.synchronize.Event,
    stop_event: multiprocessing.synchronize.Event,
) -> None:
    from boneflow.logs import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    audit = Audit.open(settings.resolved_database_url)
    try:
        siblings = _Siblings(*load_slot)
        server = _start_server(settings, audit, on_stored, listening=listening, siblings=siblings)
        handle = _handle_for(server)
        ready.set()
        with contextlib.suppress(KeyboardInterrupt):
            stop_event.wait()
        handle.stop()
    finally:
        audit.close()


def _replace_port(settings: Settings, port: int) -> Settings:
    from dataclasses import replace

    return replace(settings, port=port)
