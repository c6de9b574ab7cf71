"""The embedded broker: messages survive the process, exactly one consumer gets each."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from kombu import Connection, Exchange, Queue

from boneflow.worker.embedded import (
    clear_control_state,
    queue_depth,
    restore_claimed,
    transport_options,
)

TRANSPORT = "boneflow.worker.embedded:Transport"


def _connection(data_dir: Path) -> Connection:
    return Connection("filesystem://", transport=TRANSPORT,
                      transport_options=transport_options(data_dir))  # fmt: skip


def _publish(data_dir: Path, bodies: list[int]) -> None:
    queue = Queue("analysis", Exchange("boneflow", type="direct"), routing_key="analysis")
    with _connection(data_dir) as connection:
        producer = connection.Producer(serializer="json")
        for body in bodies:
            producer.publish(body, exchange=queue.exchange, routing_key="analysis",
                             declare=[queue])  # fmt: skip


def _drain(data_dir: Path, out: list[int] | None = None) -> list[int]:
    got: list[int] = [] if out is None else out
    with _connection(data_dir) as connection, connection.SimpleQueue("analysis") as queue:
        while True:
            try:
                message = queue.get(block=False)
            except queue.Empty:
                return got
            got.append(int(message.payload))
            message.ack()


def _drain_to_queue(data_dir: Path, results: multiprocessing.Queue[list[int]]) -> None:
    results.put(_drain(data_dir))


def test_messages_survive_the_producer_and_keep_their_order(tmp_path: Path) -> None:
    _publish(tmp_path, list(range(20)))
    assert queue_depth(tmp_path, "analysis") == 20
    assert queue_depth(tmp_path, "dispatch") == 0
    assert _drain(tmp_path) == list(range(20))
    assert queue_depth(tmp_path, "analysis") == 0


def test_concurrent_consumers_each_message_exactly_once(tmp_path: Path) -> None:
    _publish(tmp_path, list(range(300)))
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[list[int]] = context.Queue()
    consumers = [context.Process(target=_drain_to_queue, args=(tmp_path, results))
                 for _ in range(3)]  # fmt: skip
    for process in consumers:
        process.start()
    got = [n for _ in consumers for n in results.get(timeout=120)]
    for process in consumers:
        process.join(30)
    assert sorted(got) == list(range(300))


def test_claimed_but_unread_messages_are_put_back(tmp_path: Path) -> None:
    _publish(tmp_path, [7])
    root = tmp_path / "broker"
    (name,) = [p.name for p in (root / "queue").iterdir()]
    (root / "queue" / name).rename(root / "claimed" / f"4242-{name}")  # a consumer died here
    assert queue_depth(tmp_path, "analysis") == 0
    assert restore_claimed(tmp_path) == 1
    assert _drain(tmp_path) == [7]


def test_half_written_messages_are_invisible(tmp_path: Path) -> None:
    _publish(tmp_path, [1])
    queue_folder = tmp_path / "broker" / "queue"
    (queue_folder / ".000000000000001_x.analysis.msg.tmp").write_bytes(b'{"trunc')
    assert queue_depth(tmp_path, "analysis") == 1
    assert _drain(tmp_path) == [1]


def test_control_messages_of_gone_workers_are_dropped_at_start(tmp_path: Path) -> None:
    _publish(tmp_path, [1, 2])
    root = tmp_path / "broker"
    (root / "queue" / "00000000000000000001_x.w1@host.celery.pidbox.msg").write_text("{}")
    (root / "control" / "celery.pidbox.exchange").write_text("[]")
    assert clear_control_state(tmp_path, ("analysis", "dispatch")) == 1
    assert sorted(p.name for p in (root / "control").iterdir()) == ["boneflow.exchange"]
    assert _drain(tmp_path) == [1, 2]
