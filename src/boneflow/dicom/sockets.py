"""Closing a DICOM connection's socket without leaking it."""

from __future__ import annotations

import contextlib
import socket


def close_socket(sock: socket.socket | None) -> None:
    """Shut ``sock`` down and close it; close it even when the shutdown fails.

    pynetdicom closes only when ``shutdown()`` succeeds, and a peer that has already reset
    the connection makes it raise: a leaked descriptor, and a ResourceWarning whenever
    the garbage collector comes by.
    """
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
