"""``boneflow serve`` as a child process: its environment, start-up check and shutdown.

The demo runs its node this way, and so do the round-trip tests: the node gets exactly
the given settings through ``BONEFLOW_*`` variables, is ready once it answers C-ECHO, and
is stopped with its whole process group.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from boneflow.config import ENV_PREFIX, Settings
from boneflow.errors import BoneflowError

log = logging.getLogger(__name__)


class NodeError(BoneflowError):
    """The node did not start (the message carries the end of its log)."""


def node_environment(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that makes ``boneflow serve`` run with exactly ``settings``.

    Every ``BONEFLOW_*`` variable of ``base`` (default: this process's environment) is
    dropped first, so that nothing from the caller's configuration leaks in.
    """
    env = {k: v for k, v in (base or os.environ).items() if not k.startswith(ENV_PREFIX)}
    values: dict[str, object] = {
        "AE_TITLE": settings.ae_title,
        "HOST": settings.host,
        "PORT": settings.port,
        "ALLOWED_CALLERS": ",".join(
            f"{r.ae_title}@{r.host}" if r.host else r.ae_title for r in settings.allowed_callers
        ),
        "DESTINATIONS": ",".join(str(d) for d in settings.destinations),
        "DATA_DIR": settings.data_dir.resolve(),
        "DATABASE_URL": settings.database_url,
        "BROKER_URL": settings.broker_url,
        "MODEL_DIR": settings.resolved_model_dir.resolve(),
        "DEVICE": settings.device,
        "SETTLE_SECONDS": settings.settle_seconds,
        "METRICS_PORT": settings.metrics_port,
        "LOG_LEVEL": settings.log_level,
        "LOG_JSON": "true" if settings.log_json else "false",
    }
    for key, path in (("TLS_CERT", settings.tls_cert), ("TLS_KEY", settings.tls_key)):
        if path is not None:
            values[key] = path.resolve()
    if settings.tls_ca is not None:
        values["TLS_CA"] = settings.tls_ca.resolve()
    env.update({f"{ENV_PREFIX}{key}": str(value) for key, value in values.items()})
    return env


class NodeProcess:
    """``boneflow serve`` as a child process group; see :func:`start_node`."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, handle: IO[bytes]):
        self.process = process
        self.log_path = log_path
        self._handle = handle

    @property
    def running(self) -> bool:
        """True while the node's main process is alive."""
        return self.process.poll() is None

    def stop(self, timeout_seconds: float = 30.0) -> int | None:
        """SIGTERM the node, then SIGKILL whatever is left of its process group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # serve stops its own workers
            try:
                self.process.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                log.warning("the node did not stop within %.0f s; killing it", timeout_seconds)
        _signal_group(self.process.pid, signal.SIGKILL)  # workers it may have left behind
        if self.process.poll() is None:
            self.process.wait()
        self._handle.close()
        return self.process.returncode

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the node's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_node(settings: Settings, log_path: Path, timeout_seconds: float = 120.0) -> NodeProcess:
    """Start ``boneflow serve`` with ``settings`` and wait until it answers C-ECHO.

    The calling AE title of the echo is the first of ``settings.allowed_callers`` (any
    title when that is empty).

    Raises:
        NodeError: the node exited or did not answer in time (its log tail is included).
    """
    handle = log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "boneflow", "serve"],
        env=node_environment(settings),
        stdin=subprocess.DEVNULL,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    node = NodeProcess(process, log_path, handle)
    caller = settings.allowed_callers[0].ae_title if settings.allowed_callers else "ECHO"
    deadline = time.monotonic() + timeout_seconds
    with quiet(["pynetdicom"]):  # refused connections are expected while it starts
        while not _echo(settings.ae_title, settings.port, caller):
            if not node.running or time.monotonic() > deadline:
                node.stop()
                raise NodeError(f"the node did not start; {log_path}:\n{node.log_tail()}")
            time.sleep(0.25)
    return node


def _echo(ae_title: str, port: int, calling_ae_title: str) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    # pynetdicom leaks the socket of a refused connection: knock with a plain one first.
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    except OSError:
        return False

    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and int(status.Status) == 0


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        return  # the group is already gone


@contextmanager
def quiet(names: Sequence[str]) -> Iterator[None]:
    """Raise the named loggers to ERROR inside the block."""
    previous = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)
