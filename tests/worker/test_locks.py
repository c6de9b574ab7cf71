"""Job locks: one holder at a time, freed the moment the holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from boneflow.db.audit import Audit
from boneflow.db.migrate import upgrade
from boneflow.worker.locks import is_job_locked, job_lock
from tests.conftest import wait_for
from tests.worker.conftest import make_settings

_HOLDER = """
import sys, time
from pathlib import Path
from boneflow.config import Settings
from boneflow.db.audit import Audit
from boneflow.worker.locks import job_lock
settings = Settings(data_dir=Path(sys.argv[1]), database_url=sys.argv[2])
audit = Audit.open(settings.resolved_database_url)
with job_lock(settings, audit, 7) as held:
    print("held" if held else "busy", flush=True)
    time.sleep(600)
"""


def test_a_job_lock_is_exclusive_and_dies_with_its_holder(
    database_url: str, tmp_path: Path
) -> None:
    upgrade(database_url)
    settings = make_settings(tmp_path, database_url=database_url)
    audit = Audit.open(database_url)
    try:
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(tmp_path), database_url],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        assert is_job_locked(settings, audit, 7)
        assert not is_job_locked(settings, audit, 8)
        with job_lock(settings, audit, 7) as held:
            assert not held
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        holder.stdout.close()
        wait_for(lambda: not is_job_locked(settings, audit, 7), "the lock of a killed holder")
        with job_lock(settings, audit, 7) as held, job_lock(settings, audit, 7) as again:
            assert held and not again
        assert not is_job_locked(settings, audit, 7)
    finally:
        audit.close()
