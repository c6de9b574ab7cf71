"""Orthanc round-trip fixtures: a private Orthanc (Debian's binary) and `boneflow serve`.

Both run as child processes on free loopback ports with their own folders; nothing
relies on a system Orthanc. Models are the small real networks of
``tests/model_fixtures.py`` (the router sends RG3, an EXTREMITY, to ``lower_leg``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from boneflow.config import CallerRule, Destination, Settings
from boneflow.local_node import NodeProcess, start_node
from boneflow.orthanc import Orthanc, free_port, orthanc_executable
from tests.model_fixtures import make_test_models

NODE_AE_TITLE = "BONEFLOW"


@dataclass(frozen=True)
class RoundTrip:
    """A running Orthanc and a boneflow node that forward to each other."""

    orthanc: Orthanc
    settings: Settings
    node: NodeProcess


StartRoundTrip = Callable[..., RoundTrip]


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small real test models, registered once per session."""
    model_dir = tmp_path_factory.mktemp("models")
    make_test_models(model_dir)
    return model_dir


@pytest.fixture
def orthanc_binary() -> str:
    """Debian's Orthanc; missing is a failure in CI (``make test`` installs it)."""
    found = orthanc_executable()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Orthanc is required in CI: apt-get install orthanc")
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    return found


@pytest.fixture
def start_round_trip(
    tmp_path: Path, test_model_dir: Path, orthanc_binary: str
) -> Iterator[StartRoundTrip]:
    """Start Orthanc, then a node sending its results to it; both stop afterwards."""
    with ExitStack() as stack:

        def start(settle_seconds: float = 1.0) -> RoundTrip:
            settings = Settings(
                ae_title=NODE_AE_TITLE,
                host="127.0.0.1",
                port=free_port(),
                data_dir=tmp_path / "node",
                model_dir=test_model_dir,
                device="cpu",
                settle_seconds=settle_seconds,
                allowed_callers=(CallerRule("ORTHANC", "127.0.0.1"),),
            )
            boneflow = Destination("dimse", settings.ae_title, "127.0.0.1", settings.port)
            orthanc = Orthanc(tmp_path / "orthanc", boneflow, executable=orthanc_binary)
            stack.enter_context(orthanc)
            settings = replace(settings, destinations=(orthanc.node,))
            settings.data_dir.mkdir(parents=True)
            node = stack.enter_context(start_node(settings, tmp_path / "node.log"))
            return RoundTrip(orthanc, settings, node)

        yield start
