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
  queued for the DUL thread, which polls its queue every millisecond.

The hooks read pynetdicom internals, so they are installed only on the version they were
written for (:data:`PYNETDICOM_SERIES`) and only when every attribute they use is
present and no handler is bound to the per-PDU events they skip; otherwise the
association keeps pynetdicom's stock path (:func:`install_lean_receive` returns False).
"""

from __future__ import annotations

import logging
import ssl
import struct
from typing import Any

import pynetdicom
from pynetdicom import _handlers as _standard_handlers
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
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
_RSP_FIELDS_NOT_ENCODED = ("ErrorComment", "OffendingElement")


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
    if missing:
        log.warning("pynetdicom internals differ (%s): stock receive path", ", ".join(missing))
        return False
    if any(_bound_handlers(assoc, event) for event in _SKIPPED_EVENTS):
        return False
    reader = _LeanReader(assoc)
    dul._read_pdu_data = reader.read_pdus
    dimse.send_msg = reader.send_msg
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


class _LeanReader:
    """The DUL-thread reader and the direct C-STORE-RSP sender of one association."""

    def __init__(self, assoc: Any) -> None:
        self._assoc = assoc
        self._dul = assoc.dul
        self._dimse = assoc.dimse
        self._stock_send_msg = assoc.dimse.send_msg
        self._header = bytearray(6)
        self._buffer = bytearray(0)

    # ---- receiving (DUL thread) ---------------------------------------------------

    def read_pdus(self) -> None:
        """Stands in for ``DULServiceProvider._read_pdu_data``: one PDU, or a dataset run."""
        dul = self._dul
        try:
            while True:
                if not self._recv_into(memoryview(self._header)):
                    dul.event_queue.put("Evt17")  # closed before a whole header arrived
                    return
                pdu_type, _, length = struct.unpack(">BBL", self._header)
                if pdu_type not in _KNOWN_PDU_TYPES:
                    log.error("unknown PDU type 0x%02X received", pdu_type)
                    dul.event_queue.put("Evt19")
                    return
                dul.socket.check_pdu_header(pdu_type, length)
                if pdu_type != _P_DATA_TF or dul.state_machine.current_state != "Sta6":
                    self._stock_pdu(length)
                    return
                if len(self._buffer) < length:
                    self._buffer = bytearray(length)
                body = memoryview(self._buffer)[:length]
                if not self._recv_into(body):
                    dul.event_queue.put("Evt17")
                    return
                if not self._p_data(body):
                    return
                dul._idle_timer.restart()
                message = self._dimse.message
                if message is None or getattr(message, "_data_set_file", None) is None:
                    return  # message complete (or no dataset to a file): back to the reactor
                if dul._kill_thread:
                    return
        except (OSError, TimeoutError) as exc:  # as pynetdicom: a failed read closes
            log.debug("connection closed while reading a PDU: %s", exc)
            dul.event_queue.put("Evt17")

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
                target.write(body[offset + 6 : item_end])  # a dataset fragment, not the last
                target.file.flush()  # lets the write-back wrapper start writing to disk
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

    def _recv_into(self, view: memoryview) -> bool:
        """Fill ``view`` from the socket; False if the peer closed first."""
        sock = self._dul.socket.socket
        if sock is None:
            return False
        received, wanted = 0, len(view)
        while received < wanted:
            count = sock.recv_into(view[received:], wanted - received)
            if count == 0:
                return False
            received += count
        return True

    # ---- the C-STORE response (association thread) --------------------------------

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Stands in for ``DIMSEServiceProvider.send_msg``: C-STORE-RSP written directly."""
        dul = self._dul
        if (
            isinstance(primitive, C_STORE)
            and not isinstance(dul.socket.socket, ssl.SSLSocket)  # one thread per TLS socket
            and dul.to_provider_queue.empty()
            and dul.state_machine.current_state == "Sta6"
        ):
            pdu = encode_c_store_rsp(context_id, primitive)
            maximum = self._dimse.maximum_pdu_size
            if pdu is not None and (not maximum or len(pdu) - 6 <= maximum):
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


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid_bytes(uid: object) -> bytes | None:
    if uid is None or str(uid) == "":
        return None
    raw = str(uid).encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw
