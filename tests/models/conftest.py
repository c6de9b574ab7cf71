"""Fixtures of tests/models: the real radiographs and a registry of small seeded models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from boneflow.dicom.pixels import read_pixels
from boneflow.models.inference import Analyzer
from boneflow.models.registry import Registry
from tests.model_fixtures import make_test_models

RADIOGRAPHS = tuple(f"RG{n}_{s}" for n in (1, 3) for s in ("UNCR", "J2KR", "J2KI"))


def load_radiograph(name: str) -> Dataset:
    """One of pydicom-data's CR radiographs, e.g. ``RG3_J2KR``."""
    path = get_testdata_file(f"{name}.dcm")
    assert path is not None, f"pydicom-data lacks {name}.dcm"
    return pydicom.dcmread(str(path))


@pytest.fixture(scope="session")
def radiograph_pixels() -> dict[str, npt.NDArray[np.float32]]:
    """Display pixels of every RG1/RG3 file, by name."""
    return {name: read_pixels(load_radiograph(name)) for name in RADIOGRAPHS}


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding tests.model_fixtures' router and fracture models."""
    folder = tmp_path_factory.mktemp("models")
    make_test_models(folder)
    return folder


@pytest.fixture(scope="session")
def analyzer(test_model_dir: Path) -> Analyzer:
    """An Analyzer over the test models, on the CPU."""
    return Analyzer(Registry(test_model_dir), device="cpu", batch_size=4)
