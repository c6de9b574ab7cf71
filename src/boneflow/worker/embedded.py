"""The embedded Celery transport of ``boneflow serve``: kombu's filesystem transport, made safe.

Messages are files under ``DATA_DIR/broker``, so queued work survives a restart without
any broker process. Two changes to kombu's transport make it safe for several producers
and consumers on one machine: a message appears under its final name only once it is
completely written (write to a hidden file, fsync, rename), and a consumer claims a
message by renaming it into its own folder on the same file system, which exactly one
consumer can win. A consumer killed while holding a message loses it from the broker,
not from boneflow: the database is the source of truth and unfinished jobs are queued
again on start.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.transport import filesystem, virtual
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

BROKER_FOLDER = "broker"


def transport_options(data_dir: Path) -> dict[str, object]:
    """The kombu transport options for the embedded broker under ``data_dir``.

    Creates the folders it names.
    """
    root = (data_dir / BROKER_FOLDER).resolve()
    folders = {
        "data_folder_in": root / "queue",
        "data_folder_out": root / "queue",
        "processed_folder": root / "claimed",
        "control_folder": root / "control",
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    options: dict[str, object] = {k: str(v) for k, v in folders.items()}
    # A study waits for at most one poll per hop; listing one local folder costs ~0.1 ms.
    options["polling_interval"] = 0.01
    return options


def queue_depth(data_dir: Path, queue: str) -> int:
    """Messages waiting in ``queue`` of the embedded broker (0 when it does not exist)."""
    folder = data_dir / BROKER_FOLDER / "queue"
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    suffix = f".{queue}.msg"
    return sum(1 for name in names if name.endswith(suffix) and not name.startswith("."))


_stamp_lock = threading.Lock()
_last_stamp = 0


def _next_stamp() -> int:
    """Nanoseconds since the epoch, strictly increasing within this process (FIFO order)."""
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(time.time_ns(), _last_stamp + 1)
        return _last_stamp


class Channel(filesystem.Channel):
    """A filesystem channel with atomic puts and single-winner gets."""

    def _put(self, queue: str, payload: dict[str, Any], **kwargs: Any) -> None:  # type: ignore[override]
        """Write the message under a hidden name, fsync it, then rename it into place."""
        name = f"{_next_stamp():020d}_{uuid.uuid4()}.{queue}.msg"
        folder = str(self.data_folder_out)
        hidden = os.path.join(folder, f".{name}.tmp")
        with open(hidden, "wb") as handle:
            handle.write(str_to_bytes(dumps(payload)))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(hidden, os.path.join(folder, name))

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        """Claim the oldest message of ``queue`` by renaming it; only one consumer wins."""
        suffix = f".{queue}.msg"
        folder = str(self.data_folder_in)
        claimed = str(self.processed_folder)
        for name in sorted(os.listdir(folder)):
            if name.startswith(".") or not name.endswith(suffix):
                continue
            target = os.path.join(claimed, f"{os.getpid()}-{name}")
            try:
                os.rename(os.path.join(folder, name), target)
            except FileNotFoundError:  # another consumer won this one
                continue
            with open(target, "rb") as handle:
                payload = handle.read()
            os.remove(target)
            return loads(bytes_to_str(payload))
        raise Empty()

    def _size(self, queue: str) -> int:
        suffix = f".{queue}.msg"
        return sum(
            1
            for name in os.listdir(str(self.data_folder_in))
            if name.endswith(suffix) and not name.startswith(".")
        )


class Transport(filesystem.Transport):
    """The embedded transport; select it with ``broker_transport``.

    kombu keeps the bindings it has declared in one state per process; ours is one state
    per broker folder, so that a process using two DATA_DIRs (tests) declares each.
    """

    Channel = Channel

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        folder = str(client.transport_options.get("control_folder", ""))
        self.state = _STATES.setdefault(folder, virtual.BrokerState())


_STATES: dict[str, virtual.BrokerState] = {}


def restore_claimed(data_dir: Path) -> int:
    """Put back messages claimed by consumers that died before reading them.

    Call only when no consumer of the embedded broker runs (at the start of ``serve``).
    """
    root = data_dir / BROKER_FOLDER
    claimed, queue = root / "claimed", root / "queue"
    if not claimed.is_dir():
        return 0
    restored = 0
    for path in claimed.iterdir():
        name = path.name.partition("-")[2]
        if name.endswith(".msg"):
            os.replace(path, queue / name)
            restored += 1
    return restored


def clear_control_state(data_dir: Path, queues: tuple[str, ...]) -> int:
    """Drop remote-control and event messages and bindings left by workers that are gone.

    Worker names change with every start, and kombu keeps binding their ping and event
    queues, so broadcast messages for dead workers would pile up in the queue folder.
    Call only when no consumer runs (at the start of ``serve``); the workers declare what
    they need again. Messages of ``queues`` are kept.

    Returns:
        How many messages were dropped.
    """
    root = data_dir / BROKER_FOLDER
    keep = {f"{queue}.msg" for queue in queues}
    dropped = 0
    for path in (root / "queue").glob("*.msg"):
        if path.name.partition(".")[2] not in keep:
            path.unlink(missing_ok=True)
            dropped += 1
    for table in (root / "control").glob("*.exchange"):
        if table.name != "boneflow.exchange":
            table.unlink(missing_ok=True)
    return dropped
