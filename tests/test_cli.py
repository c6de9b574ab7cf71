"""The console script as a user runs it: help, config errors, db upgrade and audit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CONTRACT_COMMANDS = [
    "serve",
    "listen",
    "worker",
    "demo",
    "analyze",
    "send",
    "echo",
    "synth",
    "train",
    "evaluate",
    "models",
    "audit",
    "status",
    "db",
]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BONEFLOW_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "boneflow", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
        check=False,
    )


def test_help_lists_every_contract_command() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in CONTRACT_COMMANDS:
        assert f"    {command} " in result.stdout, command


@pytest.mark.parametrize("command", CONTRACT_COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: boneflow" in result.stdout


def test_bad_port_stops_with_one_line_naming_the_key() -> None:
    result = run("serve", env={"BONEFLOW_PORT": "notaport"})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "BONEFLOW_PORT" in lines[0]
