"""Where pynetdicom's chunked receive writes, and early disk write-back while it does.

pynetdicom (with ``STORE_RECV_CHUNKED_DATASET``) writes each incoming dataset to a
``NamedTemporaryFile`` in the system temporary folder. Here that file is put in the
listener's ``<spool>/.incoming`` folder instead (same file system as the spool, so storing
is a hard link, not a copy; partial files of dead associations are found there), and the
kernel is asked to start writing it to disk every MiB while it arrives
(``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so that the fsync before acknowledging
waits only for the tail instead of the whole image.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import tempfile
import threading
from collections.abc import Callable
from typing import IO, Any

import pynetdicom.dimse_messages

log = logging.getLogger(__name__)

INCOMING_ATTRIBUTE = "_boneflow_incoming_dir"
WRITEBACK_BYTES = 1024 * 1024  # 4 MiB left the fsync 2-3 ms more to wait (1 association)
_SYNC_FILE_RANGE_WRITE = 2


def install_incoming_tempfiles() -> None:
    """Route pynetdicom's chunked-receive files into the association's incoming folder.

    The folder is read from the association that receives: the one that owns the current
    (DUL) thread, or the association thread itself (the listener's blocking data phase),
    as the attribute :data:`INCOMING_ATTRIBUTE` set by the listener; other associations (a
    pynetdicom SCP elsewhere in the process) keep the default. Idempotent.
    """
    current = getattr(pynetdicom.dimse_messages, "NamedTemporaryFile", None)
    if getattr(current, "_boneflow", False):
        return
    original = tempfile.NamedTemporaryFile

    def named_temporary_file(*args: Any, **kwargs: Any) -> Any:
        thread = threading.current_thread()
        assoc = getattr(thread, "_assoc", thread)  # a DUL thread, or the association's own
        folder = getattr(assoc, INCOMING_ATTRIBUTE, None)
        if folder is None:
            return original(*args, **kwargs)
        wrapper = original(*args, **{**kwargs, "dir": folder})
        if _sync_file_range is not None:
            wrapper.file = _WritebackFile(wrapper.file, _sync_file_range)  # type: ignore[assignment]
        return wrapper

    named_temporary_file._boneflow = True  # type: ignore[attr-defined]
    setattr(pynetdicom.dimse_messages, "NamedTemporaryFile", named_temporary_file)  # noqa: B010


class _WritebackFile:
    """A file proxy that starts asynchronous write-back every :data:`WRITEBACK_BYTES`."""

    def __init__(self, raw: IO[bytes], sync_range: Callable[[int, int, int], None]) -> None:
        self._raw = raw
        self._sync_range = sync_range
        self._started = 0

    def write(self, data: bytes) -> int:
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()
        end = self._raw.tell()
        if end - self._started >= WRITEBACK_BYTES:
            self._sync_range(self._raw.fileno(), self._started, end - self._started)
            self._started = end

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)`` from libc, if any."""
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):
        log.debug("sync_file_range is not available; fsync does all the writing")
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, nbytes: int) -> None:
        # A hint only: a failure (unsupported file system) leaves the work to fsync.
        function(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)

    return start_writeback


_sync_file_range = _load_sync_file_range()
