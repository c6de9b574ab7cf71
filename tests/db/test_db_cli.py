"""`boneflow db upgrade` and `boneflow audit` on SQLite and PostgreSQL, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import create_engine, text

from tests.test_cli import run


def test_db_upgrade_and_audit(database_url: str, tmp_path: Path) -> None:
    env = {"BONEFLOW_DATABASE_URL": database_url, "BONEFLOW_DATA_DIR": str(tmp_path)}
    upgraded = run("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert json.loads(upgraded.stdout)["revision"] == "0001"
    empty = run("audit", "--json", env=env)
    assert empty.returncode == 0 and json.loads(empty.stdout) == []

    from boneflow.db.audit import Audit, InstanceStatus

    audit = Audit.open(database_url)
    first = audit.instance_received(status=InstanceStatus.STORED, sop_instance_uid="1.2.3")
    audit.instance_received(status=InstanceStatus.REFUSED, sop_instance_uid="1.2.4")
    audit.close()
    listed = run("audit", "--json", "--status", "refused", env=env)
    assert [row["sop_instance_uid"] for row in json.loads(listed.stdout)] == ["1.2.4"]
    assert run("audit", "--verify", env=env).returncode == 0

    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text(f"UPDATE instances SET status = 'refused' WHERE id = {first}"))
    engine.dispose()
    verified = run("audit", "--verify", env=env)
    assert verified.returncode == 1
    assert f"instances row {first}" in verified.stdout
