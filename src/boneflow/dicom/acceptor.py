"""A lean receive path for the listener's associations, hooked into pynetdicom 3.0.x.

pynetdicom reads each P-DATA-TF PDU into a new buffer, copies it to ``bytes``, decodes it
into item objects, copies every fragment again into a P-DATA primitive and once more when
writing it to the chunked-receive file. Here, on the association's DUL thread:

- each PDU is read into one buffer reused for the whole association (``recv_into``);
- the dataset fragments of a C-STORE being received to a file are written from that
  buffer straight into the file (``dimse.message._data_set_file``), and the following PDUs
  of the same dataset are read at once instead of one per reactor turn;
- everything else (command fragments, the last dataset fragment, which completes the
  message, and every other PDU type or state) goes through pynetdicom's own code;
- a C-STORE response is encoded here and written to the socket directly instead of
  queued for the DUL thread, which polls its queue every millisecond;
- once the association is established, its data phase runs on the association's thread
  alone, blocked in ``recv_into`` (:meth:`_LeanReader.run_data_phase`): the DUL thread is
  parked, nothing polls, and each C-ECHO or C-STORE request is served as soon as its last
  PDU has arrived. Every other PDU (A-RELEASE-RQ, A-ABORT, ...), any other DIMSE message,
  a closed or idle connection and a local abort hand the association back to pynetdicom's
  own two reactors, which finish it as they always do.

The hooks read pynetdicom internals, so they are installed only on the version they were
written for (:data:`PYNETDICOM_SERIES`) and only when every attribute they use is
present and no handler is bound to the per-PDU events they skip; otherwise the
association keeps pynetdicom's stock path (:func:`install_lean_receive` returns False).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pynetdicom
from pynetdicom import _handlers as _standard_handlers
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

PYNETDICOM_SERIES = "3.0."
_P_DATA_TF = 0x04
_KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
_SKIPPED_EVENTS = (
    evt.EVT_DATA_RECV,
    evt.EVT_PDU_RECV,
    evt.EVT_FSM_TRANSITION,
    evt.EVT_DIMSE_SENT,
    evt.EVT_PDU_SENT,
    evt.EVT_DATA_SENT,
)
_DUL_ATTRIBUTES = (
    "_read_pdu_data",
    "_decode_pdu",
    "_recv_pdu",
    "_idle_timer",
    "_kill_thread",
    "event_queue",
    "to_provider_queue",
    "state_machine",
    "socket",
)
_ASSOCIATION_ATTRIBUTES = (
    "_run_reactor",
    "_serve_request",
    "_kill",
    "_sent_abort",
    "acse",
    "kill",
)
_RSP_FIELDS_NOT_ENCODED = ("ErrorComment", "OffendingElement")
_WAKE_SECONDS = 0.25  # how often a blocked read looks for a local abort or the idle timeout
_PARK_SECONDS = 5.0  # how long the association thread waits for the DUL thread to park

_DUL_RUNNING, _DUL_PARK_REQUESTED, _DUL_PARKED = "running", "park requested", "parked"
_DUL_DECLINED = "declined"  # the association left Sta6 before the DUL thread could park

BLOCKING_DATA_PHASE = True  # False: pynetdicom's polling reactors run the data phase too


def lean_path_supported(version: str | None = None) -> bool:
    """True when the installed (or given) pynetdicom is the series the hooks were written for."""
    return (version or pynetdicom.__version__).startswith(PYNETDICOM_SERIES)


def install_lean_receive(assoc: Any, *, version: str | None = None) -> bool:
    """Put the lean receive path and the direct C-STORE response on one association.

    Call it before the association starts (its DUL thread must not be running yet).

    Args:
        assoc: a pynetdicom acceptor ``Association`` whose socket is set; the socket must
            offer ``check_pdu_header(pdu_type, length)`` and
            ``count_fragment(control_header, nbytes)`` (the listener's bounded socket).
        version: the pynetdicom version to check against; the installed one by default.

    Returns:
        True if installed; False if the association keeps pynetdicom's stock path.
    """
    if not lean_path_supported(version):  # reads PYNETDICOM_SERIES now, so tests can move it
        log.info("pynetdicom %s: stock receive path", version or pynetdicom.__version__)
        return False
    dul, dimse = assoc.dul, assoc.dimse
    missing = [name for name in _DUL_ATTRIBUTES if not hasattr(dul, name)]
    missing += [n for n in ("message", "receive_primitive", "send_msg") if not hasattr(dimse, n)]
    missing += [n for n in ("check_pdu_header", "count_fragment") if not hasattr(dul.socket, n)]
    missing += [n for n in _ASSOCIATION_ATTRIBUTES if not hasattr(assoc, n)]
    missing += [n for n in ("_is_transport_event", "to_user_queue") if not hasattr(dul, n)]
    missing += [n for n in ("msg_queue",) if not hasattr(dimse, n)]
    if missing:
        log.warning("pynetdicom internals differ (%s): stock receive path", ", ".join(missing))
        return False
    if any(_bound_handlers(assoc, event) for event in _SKIPPED_EVENTS):
        return False
    reader = _LeanReader(assoc)
    dul._read_pdu_data = reader.read_pdus
    dimse.send_msg = reader.send_msg
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        # pynetdicom's logging handler formats every received message, then logs nothing
        assoc.unbind(evt.EVT_DIMSE_RECV, _standard_handlers.standard_dimse_recv_handler)
    if BLOCKING_DATA_PHASE:  # read now, so that tests can switch it off
        dul._is_transport_event = reader.park_or_check_transport
        assoc._run_reactor = reader.run_data_phase
        assoc.kill = reader.kill
    return True


def encode_c_store_rsp(context_id: int, rsp: C_STORE) -> bytes | None:
    """The P-DATA-TF PDU of a C-STORE response, byte for byte as pynetdicom encodes it.

    Returns:
        The PDU, or None when the response carries fields this encoder does not write
        (an error comment, offending element, ...): pynetdicom must encode it then.
    """
    if rsp.MessageIDBeingRespondedTo is None or rsp.Status is None:
        return None
    if any(getattr(rsp, name, None) not in (None, "", b"") for name in _RSP_FIELDS_NOT_ENCODED):
        return None
    sop_class = _uid_bytes(rsp.AffectedSOPClassUID)
    sop_instance = _uid_bytes(rsp.AffectedSOPInstanceUID)
    body = b"".join(
        (
            _element(0x0002, sop_class) if sop_class is not None else b"",
            _element(0x0100, struct.pack("<H", 0x8001)),
            _element(0x0120, struct.pack("<H", int(rsp.MessageIDBeingRespondedTo))),
            _element(0x0800, struct.pack("<H", 0x0101)),
            _element(0x0900, struct.pack("<H", int(rsp.Status))),
            _element(0x1000, sop_instance) if sop_instance is not None else b"",
        )
    )
    command = _element(0x0000, struct.pack("<I", len(body))) + body
    item = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBI", _P_DATA_TF, 0, len(item)) + item


class _HandBack(Exception):
    """The blocking data phase stops here; pynetdicom's reactors take the association on."""


class _LeanReader:
    """The lean reader, the direct C-STORE-RSP sender and the blocking data phase."""

    def __init__(self, assoc: Any) -> None:
        self._assoc = assoc
        self._dul = assoc.dul
        self._dimse = assoc.dimse
        self._stock_send_msg = assoc.dimse.send_msg
        self._stock_run_reactor = assoc._run_reactor
        self._stock_is_transport_event = assoc.dul._is_transport_event
        self._stock_kill = assoc.kill
        self._restore_socket: Callable[[], None] | None = None
        self._header = bytearray(6)
        self._buffer = bytearray(0)
        self._phase = threading.Condition()
        self._dul_state = _DUL_RUNNING
        self._blocking = False

    # ---- receiving on the DUL thread (negotiation, release, and the stock path) ------

    def read_pdus(self) -> None:
        """Stands in for ``DULServiceProvider._read_pdu_data``: one PDU, or a dataset run."""
        dul = self._dul
        try:
            while True:
                if not self._read_pdu():
                    return
                message = self._dimse.message
                if message is None or getattr(message, "_data_set_file", None) is None:
                    return  # message complete (or no dataset to a file): back to the reactor
                if dul._kill_thread:
                    return
        except (OSError, TimeoutError) as exc:  # as pynetdicom: a failed read closes
            log.debug("connection closed while reading a PDU: %s", exc)
            dul.event_queue.put("Evt17")

    def _read_pdu(self) -> bool:
        """Read one PDU; True if it was a P-DATA-TF in Sta6 that was handled here.

        False when anything was queued for the DUL's state machine instead (another PDU
        type or state, a malformed PDU, a closed connection).
        """
        dul = self._dul
        if not self._recv_into(memoryview(self._header), at_boundary=True):
            dul.event_queue.put("Evt17")  # closed before a whole header arrived
            return False
        pdu_type, _, length = struct.unpack(">BBL", self._header)
        if pdu_type not in _KNOWN_PDU_TYPES:
            log.error("unknown PDU type 0x%02X received", pdu_type)
            dul.event_queue.put("Evt19")
            return False
        dul.socket.check_pdu_header(pdu_type, length)
        if pdu_type != _P_DATA_TF or dul.state_machine.current_state != "Sta6":
            self._stock_pdu(length)
            return False
        if len(self._buffer) < length:
            self._buffer = bytearray(length)
        body = memoryview(self._buffer)[:length]
        if not self._recv_into(body):
            dul.event_queue.put("Evt17")
            return False
        if not self._p_data(body):
            return False
        dul._idle_timer.restart()
        return True

    def _p_data(self, body: memoryview) -> bool:
        """Handle the PDV items of one P-DATA-TF PDU; False if it was malformed."""
        dimse = self._dimse
        count_fragment = self._dul.socket.count_fragment
        offset, end = 0, len(body)
        while offset < end:
            if offset + 6 > end:
                return self._malformed()
            item_length = int.from_bytes(body[offset : offset + 4], "big")
            item_end = offset + 4 + item_length
            if item_length < 2 or item_end > end:
                return self._malformed()
            context_id, control = body[offset + 4], body[offset + 5]
            count_fragment(control, item_length - 2)
            message = dimse.message
            target = getattr(message, "_data_set_file", None) if message is not None else None
            if control & 0x03 == 0 and target is not None:
                # a dataset fragment, not the last: into the file under the temporary-file
                # wrapper (its attribute lookup per call is measurable at 50 PDUs an image)
                stream = target.file
                stream.write(body[offset + 6 : item_end])
                stream.flush()  # lets the write-back wrapper start writing to disk
            else:
                primitive = P_DATA()
                pdv: Any = [context_id, bytes(body[offset + 5 : item_end])]  # a list, it checks
                primitive.presentation_data_value_list = [pdv]
                dimse.receive_primitive(primitive)
            offset = item_end
        return True

    def _stock_pdu(self, length: int) -> None:
        """Read the rest of a PDU and hand it to pynetdicom as its own reader would."""
        dul = self._dul
        data = bytearray(self._header)
        body = bytearray(length)
        if not self._recv_into(memoryview(body)):
            dul.event_queue.put("Evt17")
            return
        data += body
        try:
            pdu, event = dul._decode_pdu(data)
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: an undecodable PDU is Evt19
            log.error("unable to decode the received PDU: %s", exc)
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)

    def _malformed(self) -> bool:
        log.error("malformed P-DATA-TF PDU received")
        self._dul.event_queue.put("Evt19")
        return False

    def _recv_into(self, view: memoryview, *, at_boundary: bool = False) -> bool:
        """Fill ``view`` from the socket; False if the peer closed first.

        In the blocking data phase the socket wakes every :data:`_WAKE_SECONDS`: a local
        abort, or an idle timeout between PDUs (``at_boundary``, nothing read yet), raise
        :class:`_HandBack`; a peer silent for the network timeout in the middle of a PDU
        raises TimeoutError, as the socket's own timeout does on the stock path.
        """
        sock = self._dul.socket.socket
        if sock is None:
            return False
        received, wanted = 0, len(view)
        last_byte = time.monotonic()
        while received < wanted:
            try:
                count = sock.recv_into(view[received:], wanted - received)
            except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO
                if not self._blocking:
                    raise
                self._check_wake(at_boundary and received == 0, last_byte)
                continue
            if count == 0:
                return False
            received += count
            last_byte = time.monotonic()
        return True

    def _check_wake(self, between_pdus: bool, last_byte: float) -> None:
        if self._interrupted():
            raise _HandBack("local abort")
        if between_pdus:
            if self._dul.idle_timer_expired():
                raise _HandBack("network timeout")  # pynetdicom aborts the association
            return
        limit = self._assoc.network_timeout
        if limit and time.monotonic() - last_byte >= limit:
            raise TimeoutError(f"no data for {limit} s in the middle of a PDU")

    # ---- the blocking data phase (association thread) -----------------------------

    def run_data_phase(self) -> None:
        """Stands in for ``Association._run_reactor`` once the association is established.

        Parks the DUL thread, reads and serves on this thread until something needs
        pynetdicom's reactors, then hands the association back to them.
        """
        sock = self._dul.socket.socket
        if sock is not None and self._park_dul():
            self._blocking = True
            try:
                self._restore_socket = self._wake_periodically(sock)
                self._serve_blocking()
            except _HandBack as reason:
                log.debug("data phase handed back to pynetdicom: %s", reason)
            except OSError as exc:  # as the stock reader: a failed read closes
                log.debug("connection closed in the data phase: %s", exc)
                self._dul.event_queue.put("Evt17")
            except Exception:  # our own fault: abort the association, as pynetdicom would
                log.exception("blocking data phase failed; aborting the association")
                self._dul.event_queue.put("Evt19")
            finally:
                self._end_blocking()
        self._stock_run_reactor()

    def kill(self) -> None:
        """Stands in for ``Association.kill``: first gives the socket back if this thread has it.

        pynetdicom aborts from the association's own thread (a message on a presentation
        context that was not accepted, a service class that fails) and then waits here
        for the DUL thread to close the connection, which it cannot do while parked.
        """
        if self._blocking and threading.current_thread() is self._assoc:
            self._end_blocking()
        self._stock_kill()

    def _end_blocking(self) -> None:
        """Hand the socket back to pynetdicom's reactors and wake the DUL thread (once)."""
        if not self._blocking:
            return
        self._blocking = False
        if self._restore_socket is not None:
            with contextlib.suppress(OSError):
                self._restore_socket()
        self._unpark_dul()

    def _wake_periodically(self, sock: socket.socket) -> Callable[[], None]:
        """Make reads return every :data:`_WAKE_SECONDS`; returns what undoes it.

        Plain TCP: a blocking descriptor with ``SO_RCVTIMEO`` (a read is one system call;
        with Python's own timeout each read is a poll and a read) and ``SO_SNDTIMEO`` at
        the network timeout. TLS: Python's timeout, since OpenSSL must see the timeouts.
        """
        timeout = sock.gettimeout()
        if isinstance(sock, ssl.SSLSocket):
            sock.settimeout(_WAKE_SECONDS)
            return lambda: sock.settimeout(timeout)
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(_WAKE_SECONDS))
        network = self._assoc.network_timeout or 0
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(network))

        def restore() -> None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0))
            sock.settimeout(timeout)

        return restore

    def park_or_check_transport(self) -> bool:
        """Stands in for ``DULServiceProvider._is_transport_event`` on the DUL thread.

        While the association thread runs the data phase, the DUL thread waits here, at a
        point where it holds no PDU and has no event or primitive queued. Once the
        association has left Sta6 (the peer released or aborted at once), it declines.
        """
        dul = self._dul
        with self._phase:
            if self._dul_state == _DUL_PARK_REQUESTED:
                state = dul.state_machine.current_state
                if state == "Sta6" and dul.event_queue.empty():
                    self._dul_state = _DUL_PARKED
                    self._phase.notify_all()
                    while self._dul_state == _DUL_PARKED:
                        self._phase.wait()
                    return True  # something may be queued: let the reactor look at once
                if state not in ("Sta3", "Sta6"):  # Sta3: the A-ASSOCIATE-AC is not out yet
                    self._dul_state = _DUL_DECLINED
                    self._phase.notify_all()
        return bool(self._stock_is_transport_event())

    def _park_dul(self) -> bool:
        """Ask the DUL thread to park; False (stock reactors) if it declines or is gone."""
        with self._phase:
            self._dul_state = _DUL_PARK_REQUESTED
            self._phase.wait_for(
                lambda: self._dul_state in (_DUL_PARKED, _DUL_DECLINED) or not self._dul.is_alive(),
                timeout=_PARK_SECONDS,
            )
            if self._dul_state == _DUL_PARKED:
                return True
            self._dul_state = _DUL_RUNNING
            return False

    def _unpark_dul(self) -> None:
        with self._phase:
            self._dul_state = _DUL_RUNNING
            self._phase.notify_all()

    def _serve_blocking(self) -> None:
        """Serve C-ECHO and C-STORE requests as their last PDU arrives; return to hand back."""
        self._assoc._is_paused = False
        dimse = self._dimse
        while self._serve_queued_requests() and not self._interrupted():
            while self._read_pdu():  # the PDUs of one dataset back to back
                message = dimse.message
                if message is None or getattr(message, "_data_set_file", None) is None:
                    break  # a message may be complete: serve it
                if self._interrupted():
                    return
            else:
                return  # something for pynetdicom's reactors was queued

    def _serve_queued_requests(self) -> bool:
        """Serve complete C-ECHO/C-STORE requests; False if anything else is waiting."""
        dimse, dul = self._dimse, self._dul
        while self._blocking:  # False once a service class has killed the association
            if not dul.event_queue.empty() or not dul.to_user_queue.empty():
                return False  # an event (Evt19 of an invalid message) or an indication
            try:
                context_id, message = dimse.msg_queue.queue[0]
            except IndexError:
                return True
            if not isinstance(message, (C_STORE, C_ECHO)) or not message.is_valid_request:
                return False  # C-FIND, a response, ...: pynetdicom's reactor serves it
            dimse.msg_queue.get()
            self._assoc._serve_request(message, context_id)
            _delete_unconsumed(message)
            self._send_queued_p_data()
        return False

    def _send_queued_p_data(self) -> None:
        """Send the P-DATA a service class queued for the (parked) DUL thread."""
        dul = self._dul
        while self._blocking and dul.state_machine.current_state == "Sta6":
            try:
                primitive = dul.to_provider_queue.queue[0]
            except IndexError:
                return
            if not isinstance(primitive, P_DATA):
                return  # an abort or release: for pynetdicom's reactors
            with self._network_timeout():
                dul._process_recv_primitive()  # queues Evt9
                dul.state_machine.do_action(dul.event_queue.get(block=False))  # DT-1: send

    def _interrupted(self) -> bool:
        """A local abort or kill, or something queued that only the DUL thread handles."""
        assoc, dul = self._assoc, self._dul
        return bool(
            assoc._kill
            or assoc._sent_abort
            or dul._kill_thread
            or not dul.to_provider_queue.empty()
        )

    @contextlib.contextmanager
    def _network_timeout(self) -> Iterator[None]:
        """Send under the network timeout, not the short wake-up of the blocked reads."""
        sock = self._dul.socket.socket
        if not self._blocking or not isinstance(sock, ssl.SSLSocket):
            yield  # plain TCP: SO_SNDTIMEO is the network timeout already
            return
        sock.settimeout(self._assoc.network_timeout)
        try:
            yield
        finally:
            sock.settimeout(_WAKE_SECONDS)

    # ---- the C-STORE response (association thread) --------------------------------

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Stands in for ``DIMSEServiceProvider.send_msg``: C-STORE-RSP written directly."""
        dul = self._dul
        if (
            isinstance(primitive, C_STORE)
            # one thread per TLS socket: the DUL thread's, unless it is parked
            and (self._blocking or not isinstance(dul.socket.socket, ssl.SSLSocket))
            and dul.to_provider_queue.empty()
            and dul.state_machine.current_state == "Sta6"
        ):
            pdu = encode_c_store_rsp(context_id, primitive)
            maximum = self._dimse.maximum_pdu_size
            if pdu is not None and (not maximum or len(pdu) - 6 <= maximum):
                with self._network_timeout():
                    dul.socket.send(pdu)
                return
        self._stock_send_msg(primitive, context_id)


def _bound_handlers(assoc: Any, event: Any) -> list[Any]:
    """Handlers bound to ``event`` besides pynetdicom's own debug-logging ones."""
    return [
        handler
        for handler, _args in assoc.get_handlers(event)
        if getattr(handler, "__module__", "") != _standard_handlers.__name__
    ]


def _delete_unconsumed(message: Any) -> None:
    """Delete a C-STORE's received file that no handler consumed.

    pynetdicom deletes it after the C-STORE handler; when none ran (it aborted the
    association instead, e.g. for a SOP class without a service class), the file would
    stay in ``.incoming`` until the next start.
    """
    stream = getattr(message, "_dataset_file", None)
    if stream is None:
        return
    with contextlib.suppress(OSError):
        stream.close()
        os.unlink(stream.name)  # FileNotFoundError after pynetdicom's own delete


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid_bytes(uid: object) -> bytes | None:
    if uid is None or str(uid) == "":
        return None
    raw = str(uid).encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw
