"""The service edges: bad queues, a database that does not answer, a port that is taken."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from boneflow.config import Settings
from boneflow.errors import BoneflowError
from boneflow.worker.app import create_app
from boneflow.worker.service import Node, prepare, run_worker
from tests.conftest import free_port
from tests.worker.conftest import make_settings


def test_unknown_queues_are_refused(settings: Settings) -> None:
    with pytest.raises(SystemExit, match="--queues"):
        run_worker(settings, queues=["analysis", "gpu"], concurrency=1)
    with pytest.raises(SystemExit, match="--queues"):
        run_worker(settings, queues=[], concurrency=1)


def test_a_database_that_does_not_answer_is_a_clear_error(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    settings = make_settings(tmp_path, database_url=url)
    with pytest.raises(BoneflowError, match="the database does not answer"):
        prepare(settings, wait_seconds=0)


def test_a_port_that_is_taken_is_a_clear_error(settings: Settings) -> None:
    prepare(settings)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = make_settings(settings.data_dir, port=taken.getsockname()[1])
        node = Node(busy, create_app(busy))
        with pytest.raises(BoneflowError, match=r"cannot listen on 127\.0\.0\.1"):
            node.start()
        node.stop()


def test_serve_leaves_one_cpu_to_the_listener_and_dispatcher() -> None:
    from boneflow.worker.service import analysis_threads

    cpus = len(os.sched_getaffinity(0))
    assert analysis_threads() == max(1, cpus - 1)
