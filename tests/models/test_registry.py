"""The model registry: round trip, integrity, selection and ``boneflow models``."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from boneflow.config import Settings
from boneflow.errors import ModelIntegrityError, ModelNotFound
from boneflow.findings import BODY_PARTS
from boneflow.models.networks import build_network
from boneflow.models.registry import (
    FRACTURE_LABELS,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ModelManifest,
    Registry,
    models_command,
)
from boneflow.models.transforms import PreprocessParams


def _manifest(name: str = "fx", version: str = "1", **changes: object) -> ModelManifest:
    base = ModelManifest(
        name=name,
        version=version,
        task="fracture",
        architecture="resnet10",
        labels=FRACTURE_LABELS,
        body_parts=("hand", "wrist"),
        input_size=128,
        preprocessing=PreprocessParams(input_size=128).to_dict(),
        threshold=0.42,
        metrics={"auroc": 0.91, "sensitivity": 0.88},
        data_fingerprint="synth:abc",
        training={"epochs": 3},
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def _router(version: str = "1", created_at: str = "") -> ModelManifest:
    return ModelManifest(
        name="router",
        version=version,
        task="router",
        architecture="resnet10",
        labels=BODY_PARTS,
        body_parts=BODY_PARTS,
        threshold=0.6,
        created_at=created_at,
    )


@pytest.fixture
def network() -> torch.nn.Module:
    torch.manual_seed(3)
    return build_network("resnet10", 2)


def test_round_trip(tmp_path: Path, network: torch.nn.Module) -> None:
    registry = Registry(tmp_path)
    written = registry.register(network, _manifest())
    assert len(written.weights_sha256) == 64
    assert written.created_at  # filled in
    folder = tmp_path / "fx" / "1"
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST_FILE, WEIGHTS_FILE]
    assert registry.list() == [written]
    assert ModelManifest.from_dict(json.loads((folder / MANIFEST_FILE).read_text())) == written

    loaded = registry.load("fx")
    assert loaded.manifest == written
    assert not loaded.network.training
    original = network.state_dict()
    for key, value in loaded.network.state_dict().items():
        assert torch.equal(value, original[key]), key
    x = torch.rand(2, 1, 64, 64)
    network.eval()
    with torch.inference_mode():
        assert torch.equal(loaded.network(x), network(x))


def test_tampered_weights_are_refused(tmp_path: Path, network: torch.nn.Module) -> None:
    registry = Registry(tmp_path)
    registry.register(network, _manifest())
    weights = tmp_path / "fx" / "1" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        registry.load("fx")


def test_replaced_weights_with_a_fixed_up_checksum_must_still_fit(
    tmp_path: Path, network: torch.nn.Module
) -> None:
    registry = Registry(tmp_path)
    registry.register(network, _manifest())
    folder = tmp_path / "fx" / "1"
    save_file({"unexpected": torch.zeros(3)}, str(folder / WEIGHTS_FILE))
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["weights_sha256"] = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match="do not fit"):
        registry.load("fx")


def test_missing_weights_are_an_integrity_error(tmp_path: Path, network: torch.nn.Module) -> None:
    registry = Registry(tmp_path)
    registry.register(network, _manifest())
    (tmp_path / "fx" / "1" / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelIntegrityError, match="cannot read"):
        registry.load("fx")


def test_versions_are_never_overwritten(tmp_path: Path, network: torch.nn.Module) -> None:
    registry = Registry(tmp_path)
    first = registry.register(network, _manifest())
    with pytest.raises(FileExistsError):
        registry.register(build_network("resnet10", 2), _manifest())
    assert registry.list() == [first]
    assert [p.name for p in (tmp_path / "fx").iterdir()] == ["1"]  # no staging left behind


def test_selection_of_router_and_fracture_models(tmp_path: Path, network: torch.nn.Module) -> None:
    registry = Registry(tmp_path)
    with pytest.raises(ModelNotFound):
        registry.router()
    router_net = build_network("resnet10", len(BODY_PARTS))
    registry.register(router_net, _router("1", "2026-01-01T00:00:00+00:00"))
    registry.register(router_net, _router("2", "2026-02-01T00:00:00+00:00"))
    assert registry.router().version == "2"
    registry.register(network, _manifest("arm", "1", created_at="2026-01-01T00:00:00+00:00"))
    registry.register(network, _manifest("arm", "2", created_at="2026-03-01T00:00:00+00:00"))
    registry.register(network, _manifest("leg", "1", body_parts=("lower_leg",)))
    chosen = registry.fracture_model_for("hand")
    assert chosen is not None
    assert chosen.model_id == "arm@2"
    leg = registry.fracture_model_for("lower_leg")
    assert leg is not None
    assert leg.model_id == "leg@1"
    assert registry.fracture_model_for("other") is None
    assert registry.manifest("arm", "1").version == "1"
    assert registry.next_version("arm") == "3"
    assert registry.next_version("new") == "1"
    with pytest.raises(ModelNotFound):
        registry.load("arm", "9")


def test_natural_version_order_breaks_ties(tmp_path: Path, network: torch.nn.Module) -> None:
    registry = Registry(tmp_path)
    same_time = "2026-01-01T00:00:00+00:00"
    for version in ("2", "10", "9"):
        registry.register(network, _manifest(version=version, created_at=same_time))
    assert [m.version for m in registry.list()] == ["2", "9", "10"]
    assert registry.manifest("fx").version == "10"


def test_unreadable_manifest_is_skipped_with_a_warning(
    tmp_path: Path, network: torch.nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry(tmp_path)
    good = registry.register(network, _manifest())
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / MANIFEST_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert registry.list() == [good]
    assert "broken" in caplog.text


def test_manifest_validation() -> None:
    with pytest.raises(ValueError, match="labels"):
        _manifest(labels=("a", "b"))
    with pytest.raises(ValueError, match="name"):
        _manifest(name="../escape")
    with pytest.raises(ValueError, match="threshold"):
        _manifest(threshold=1.5)
    with pytest.raises(ValueError, match="task"):
        _manifest(task="segmentation")
    with pytest.raises(ValueError, match="scale"):
        _manifest(calibration={"scale": 0.0, "offset": 0.0})
    with pytest.raises(ValueError, match="offset"):
        _manifest(calibration={"scale": 1.0, "offset": float("nan")})
    with pytest.raises(ValueError, match="only a fracture model"):
        replace(_router(), calibration={"scale": 1.0, "offset": 0.0})
    with pytest.raises(ValueError, match="not one of body_parts"):
        _manifest(calibration_by_part={"elbow": {"scale": 1.0, "offset": 0.0}})
    with pytest.raises(ValueError, match="calibration of hand scale"):
        _manifest(calibration_by_part={"hand": {"scale": -1.0, "offset": 0.0}})
    with pytest.raises(ValueError, match="only a fracture model"):
        replace(_router(), calibration_by_part={"hand": {"scale": 1.0, "offset": 0.0}})
    with pytest.raises(ValueError, match="resnet10 cannot score mirror images"):
        _manifest(mirror=True)
    with pytest.raises(ValueError, match="cannot score mirror images"):
        replace(_router(), architecture="fracnet", mirror=True)
    with pytest.raises(ValueError, match="resnet10 cannot score in tiles"):
        _manifest(tile=320, tile_margin=64)
    with pytest.raises(ValueError, match="multiples of 8"):
        _manifest(architecture="fracnet", tile=300, tile_margin=64)
    with pytest.raises(ValueError, match="resnet10 cannot score rotated views"):
        _manifest(rotation=6.0)
    with pytest.raises(ValueError, match="use 0 \\(off\\) to 45"):
        _manifest(architecture="fracnet", rotation=60.0)


def test_mirror_scoring_round_trips_and_older_manifests_score_single_images(
    tmp_path: Path,
) -> None:
    registry = Registry(tmp_path)
    torch.manual_seed(4)
    fracnet = build_network("fracnet", 2)
    registry.register(fracnet, _manifest(architecture="fracnet", mirror=True))
    loaded = registry.load("fx")
    assert loaded.manifest.mirror is True and loaded.network.mirror is True
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.network(x), loaded.network(x.flip(-1)))
    path = tmp_path / "fx" / "1" / MANIFEST_FILE
    data = json.loads(path.read_text())
    assert data["mirror"] is True
    del data["mirror"]  # a manifest written before mirror scoring existed
    path.write_text(json.dumps(data))
    older = registry.load("fx")
    assert older.manifest.mirror is False and older.network.mirror is False


def test_rotated_views_round_trip_and_older_manifests_score_one_view(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    torch.manual_seed(6)
    registry.register(build_network("fracnet", 2), _manifest(architecture="fracnet", rotation=6))
    loaded = registry.load("fx")
    assert loaded.manifest.rotation == 6.0 and loaded.network.rotation == 6.0
    rows: list[int] = []
    loaded.network.stem.register_forward_hook(lambda _m, i, _o: rows.append(i[0].shape[0]))
    with torch.inference_mode():
        loaded.network(torch.rand(2, 1, 64, 64))
    assert rows == [6]  # the images and each turned both ways, in one pass
    path = tmp_path / "fx" / "1" / MANIFEST_FILE
    data = json.loads(path.read_text())
    assert data["rotation"] == 6.0
    del data["rotation"]  # a manifest written before rotated views existed
    path.write_text(json.dumps(data))
    older = registry.load("fx")
    assert older.manifest.rotation == 0.0 and older.network.rotation == 0.0


def test_tiled_scoring_round_trips_and_older_manifests_score_whole_images(
    tmp_path: Path,
) -> None:
    registry = Registry(tmp_path)
    torch.manual_seed(5)
    registry.register(
        build_network("fracnet", 2), _manifest(architecture="fracnet", tile=64, tile_margin=16)
    )
    loaded = registry.load("fx")
    assert (loaded.manifest.tile, loaded.manifest.tile_margin) == (64, 16)
    assert (loaded.network.tile, loaded.network.tile_margin) == (64, 16)  # type: ignore[union-attr]
    path = tmp_path / "fx" / "1" / MANIFEST_FILE
    data = json.loads(path.read_text())
    assert (data["tile"], data["tile_margin"]) == (64, 16)
    x = torch.rand(1, 1, 128, 128)
    with torch.inference_mode():
        tiled = loaded.network(x)
    del data["tile"], data["tile_margin"]  # a manifest written before tiled scoring existed
    path.write_text(json.dumps(data))
    older = registry.load("fx")
    assert older.manifest.tile == 0 and older.network.tile == 0  # type: ignore[union-attr]
    with torch.inference_mode():
        assert not torch.allclose(older.network(x), tiled, atol=1e-5)


def test_calibration_round_trips_and_older_manifests_report_the_raw_probability(
    tmp_path: Path, network: torch.nn.Module
) -> None:
    registry = Registry(tmp_path)
    registry.register(network, _manifest(calibration={"scale": 2.0, "offset": -1.0}))
    loaded = registry.load("fx").manifest
    assert loaded.calibration == {"scale": 2.0, "offset": -1.0}
    # sigmoid(2 * logit(p) - 1): p = 0.5 -> sigmoid(-1), monotone, within 0..1
    assert loaded.fracture_probability([0.5])[0] == pytest.approx(1 / (1 + np.e))
    p = np.linspace(0.0, 1.0, 11)
    calibrated = loaded.fracture_probability(p)
    assert np.all(np.diff(calibrated) > 0) and 0.0 < calibrated.min() < calibrated.max() < 1.0
    # a manifest written before calibration existed: the network's p unchanged
    old = registry.register(network, _manifest(version="2"))
    path = tmp_path / "fx" / "2" / MANIFEST_FILE
    data = json.loads(path.read_text())
    del data["calibration"]
    path.write_text(json.dumps(data))
    assert old.calibration == {} and registry.load("fx", "2").manifest.calibration == {}
    assert np.array_equal(registry.load("fx", "2").manifest.fracture_probability(p), p)


def test_a_body_part_with_its_own_calibration_uses_it(
    tmp_path: Path, network: torch.nn.Module
) -> None:
    registry = Registry(tmp_path)
    own = {"hand": {"scale": 1.0, "offset": -2.0}}
    registry.register(
        network,
        _manifest(calibration={"scale": 2.0, "offset": -1.0}, calibration_by_part=own),
    )
    loaded = registry.load("fx").manifest
    assert loaded.calibration_by_part == own
    p = np.array([0.5, 0.5, 0.5])
    model_wide = 1 / (1 + np.e)  # sigmoid(2 * logit(0.5) - 1)
    hand = 1 / (1 + np.e**2)  # sigmoid(logit(0.5) - 2)
    assert loaded.fracture_probability(p, ["wrist", "hand", "wrist"]) == pytest.approx(
        [model_wide, hand, model_wide]
    )
    assert loaded.fracture_probability(p, "hand") == pytest.approx([hand] * 3)
    # no part given (or an unknown one): the model-wide calibration
    assert loaded.fracture_probability(p) == pytest.approx([model_wide] * 3)
    assert loaded.fracture_probability(p, "elbow") == pytest.approx([model_wide] * 3)
    with pytest.raises(ValueError, match="2 body parts for 3"):
        loaded.fracture_probability(p, ["hand", "wrist"])
    # a manifest written before per-part calibration existed reads as model-wide only
    path = tmp_path / "fx" / "1" / MANIFEST_FILE
    data = json.loads(path.read_text())
    del data["calibration_by_part"]
    path.write_text(json.dumps(data))
    older = registry.manifest("fx", "1")
    assert older.calibration_by_part == {}
    assert older.fracture_probability(p, "hand") == pytest.approx([model_wide] * 3)


def test_models_command(
    tmp_path: Path, network: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(data_dir=tmp_path)
    assert models_command(settings, as_json=True) == 0
    assert json.loads(capsys.readouterr().out) == []
    Registry(settings.resolved_model_dir).register(network, _manifest())
    assert models_command(settings, as_json=True) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["version"], m["threshold"]) for m in listed] == [("fx", "1", 0.42)]
    assert listed[0]["metrics"]["auroc"] == 0.91
    assert models_command(settings, as_json=False) == 0
    table = capsys.readouterr().out
    assert "fx@1" in table
    assert "0.420" in table and "calibrated" not in table
    scaling = {"scale": 1.5, "offset": -0.5}
    registry = Registry(settings.resolved_model_dir)
    registry.register(network, _manifest("fx", "2", calibration=scaling))
    assert models_command(settings, as_json=False) == 0
    assert "0.420 (calibrated P)" in capsys.readouterr().out  # a threshold on calibrated P
