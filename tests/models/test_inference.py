"""The Analyzer on the real RG1 (chest) and RG3 (lower leg) radiographs with small real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from boneflow.errors import ConfigError, ModelNotFound
from boneflow.findings import BODY_PARTS, FindingStatus, ModelId
from boneflow.models.inference import (
    Analyzer,
    ImageInput,
    part_from_header,
    resolve_device,
)
from boneflow.models.networks import build_network
from boneflow.models.registry import ModelManifest, Registry
from tests.models.conftest import RADIOGRAPHS, load_radiograph

Pixels = dict[str, npt.NDArray[np.float32]]


def _input(name: str, pixels: Pixels, hint: str | None = "from-header") -> ImageInput:
    ds = load_radiograph(name)
    part = str(ds.BodyPartExamined) if hint == "from-header" else hint
    return ImageInput(str(ds.SOPInstanceUID), pixels[name], part, "R" if "RG3" in name else None)


def test_rg1_chest_is_not_analysed_and_rg3_lower_leg_is(
    analyzer: Analyzer, radiograph_pixels: Pixels
) -> None:
    images = [_input(name, radiograph_pixels) for name in RADIOGRAPHS]
    findings = analyzer.analyse(images)
    assert [f.sop_instance_uid for f in findings] == [i.sop_instance_uid for i in images]
    for name, finding in zip(RADIOGRAPHS, findings, strict=True):
        assert finding.router == ModelId("test-router", "1")
        assert {"preprocess", "router", "total"} <= set(finding.timings_ms)
        if name.startswith("RG1"):  # CHEST in the header: "other", no fracture model
            assert finding.status == FindingStatus.NOT_ANALYSED
            assert finding.body_part == "other"
            assert finding.reason == "no fracture model covers body part 'other'"
            assert finding.heatmap is None
            assert finding.fracture_probability is None
        else:  # EXTREMITY is too vague to be a prior; the router decides
            assert finding.status == FindingStatus.ANALYSED
            assert finding.body_part == "lower_leg"
            assert finding.fracture_model == ModelId("test-fracture-leg", "1")
            assert finding.laterality == "R"
            assert finding.threshold == 0.5
            probability = finding.fracture_probability
            assert probability is not None
            assert 0.0 <= probability <= 1.0
            assert finding.fracture_present == (probability >= 0.5)
            assert finding.heatmap is not None
            assert finding.heatmap.shape == (1760, 1760)  # the source grid
            assert finding.heatmap.dtype == np.float32
            assert {"fracture", "heatmap"} <= set(finding.timings_ms)
            assert finding.models == {
                "router": "test-router@1",
                "fracture": "test-fracture-leg@1",
            }


def test_results_agree_across_transfer_syntaxes(
    analyzer: Analyzer, radiograph_pixels: Pixels
) -> None:
    by_name = {
        name: f
        for name, f in zip(
            RADIOGRAPHS,
            analyzer.analyse([_input(n, radiograph_pixels) for n in RADIOGRAPHS]),
            strict=True,
        )
    }
    for prefix in ("RG1", "RG3"):
        plain, lossless, lossy = (by_name[f"{prefix}_{s}"] for s in ("UNCR", "J2KR", "J2KI"))
        assert plain.body_part_confidence == lossless.body_part_confidence
        assert plain.fracture_probability == lossless.fracture_probability
        assert abs(plain.body_part_confidence - lossy.body_part_confidence) < 0.01
        if plain.fracture_probability is not None:
            assert lossy.fracture_probability is not None
            assert abs(plain.fracture_probability - lossy.fracture_probability) < 0.02


def test_batching_gives_the_same_answers_as_one_by_one(
    analyzer: Analyzer, radiograph_pixels: Pixels
) -> None:
    images = [_input(n, radiograph_pixels, hint=h) for n in RADIOGRAPHS for h in ("HAND", None)]
    together = analyzer.analyse(images)  # batch size 4: several batches, two fracture models
    for image, batched in zip(images, together, strict=True):
        (alone,) = analyzer.analyse([image])
        assert alone.body_part == batched.body_part
        assert alone.body_part_confidence == pytest.approx(batched.body_part_confidence, abs=1e-5)
        assert alone.fracture_probability == pytest.approx(batched.fracture_probability, abs=1e-5)


def test_header_prior_settles_a_close_call(analyzer: Analyzer, radiograph_pixels: Pixels) -> None:
    hand, leg, vague = analyzer.analyse(
        [_input("RG3_UNCR", radiograph_pixels, hint=h) for h in ("HAND", "LEG", "EXTREMITY")]
    )
    assert hand.body_part == "hand"
    assert hand.fracture_model == ModelId("test-fracture-arm", "1")
    assert leg.body_part == "lower_leg"
    assert vague.body_part == "lower_leg"  # the router's own (slight) lean
    assert hand.body_part_confidence > vague.body_part_confidence


def test_header_prior_cannot_overrule_a_confident_router(
    tmp_path: Path, radiograph_pixels: Pixels
) -> None:
    registry = Registry(tmp_path)
    router = build_network("resnet10", len(BODY_PARTS))
    head = router.fc
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[BODY_PARTS.index("other")] = 6.0  # P(other) ~ 0.98
    registry.register(router, _router_manifest(threshold=0.5))
    (finding,) = Analyzer(registry, "cpu").analyse([_input("RG3_UNCR", radiograph_pixels, "HAND")])
    assert finding.body_part == "other"
    assert finding.status == FindingStatus.NOT_ANALYSED
    assert finding.body_part_confidence > 0.9  # x4 on P(hand) ~ 0.003 changes little


def test_router_below_its_threshold_is_not_analysed(
    tmp_path: Path, radiograph_pixels: Pixels
) -> None:
    registry = Registry(tmp_path)
    torch.manual_seed(0)
    registry.register(build_network("resnet10", len(BODY_PARTS)), _router_manifest(0.95))
    (finding,) = Analyzer(registry, "cpu").analyse([_input("RG3_UNCR", radiograph_pixels, None)])
    assert finding.status == FindingStatus.NOT_ANALYSED
    assert finding.body_part is None  # never a guess
    assert finding.reason is not None
    assert "router not confident" in finding.reason
    assert "0.95" in finding.reason


def test_models_are_loaded_once(test_model_dir: Path, radiograph_pixels: Pixels) -> None:
    registry = Registry(test_model_dir)
    loads: list[str] = []
    original = registry.load

    def counting_load(name: str, version: str | None = None):  # type: ignore[no-untyped-def]
        loads.append(name)
        return original(name, version)

    registry.load = counting_load  # type: ignore[method-assign]
    analyzer = Analyzer(registry, "cpu")
    for _ in range(3):
        analyzer.analyse([_input("RG3_UNCR", radiograph_pixels, h) for h in ("HAND", None)])
    assert sorted(loads) == ["test-fracture-arm", "test-fracture-leg", "test-router"]
    assert analyzer.loaded_models == sorted(
        ["test-router@1", "test-fracture-arm@1", "test-fracture-leg@1"]
    )


def test_an_image_that_cannot_be_preprocessed_does_not_stop_the_others(
    analyzer: Analyzer, radiograph_pixels: Pixels
) -> None:
    broken = ImageInput("1.2.3.4", np.full((64, 64), np.nan, dtype=np.float32))
    good = _input("RG3_UNCR", radiograph_pixels)
    first, second = analyzer.analyse([broken, good])
    assert first.status == FindingStatus.NOT_ANALYSED
    assert first.reason is not None
    assert "could not be preprocessed" in first.reason
    assert second.status == FindingStatus.ANALYSED
    assert analyzer.analyse([]) == []


def test_no_router_means_no_analyzer(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        Analyzer(Registry(tmp_path), "cpu")


def test_part_from_header() -> None:
    assert part_from_header("HAND") == "hand"
    assert part_from_header("finger") == "hand"
    assert part_from_header("LEG") == "lower_leg"
    assert part_from_header("lower_leg") == "lower_leg"
    assert part_from_header("CHEST") == "other"
    assert part_from_header("KNEE") == "other"
    assert part_from_header("EXTREMITY") is None
    assert part_from_header("ARM") is None
    assert part_from_header("") is None
    assert part_from_header(None) is None


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ConfigError, match="DEVICE"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda:0")


def _router_manifest(threshold: float) -> ModelManifest:
    return ModelManifest(
        name="router",
        version="1",
        task="router",
        architecture="resnet10",
        labels=BODY_PARTS,
        body_parts=BODY_PARTS,
        threshold=threshold,
    )


def test_heatmap_of_a_non_square_image_is_on_its_source_grid(
    analyzer: Analyzer, radiograph_pixels: Pixels
) -> None:
    (finding,) = analyzer.analyse([_input("RG1_J2KR", radiograph_pixels, hint="HAND")])
    assert finding.status == FindingStatus.ANALYSED  # the header prior sent it to "hand"
    assert finding.heatmap is not None
    assert finding.heatmap.shape == (1955, 1841)
    assert 0.0 <= float(finding.heatmap.min()) <= float(finding.heatmap.max()) <= 1.0
    assert float(finding.heatmap.max()) > 0.99  # the test models' maps are not empty
    box = finding.hotspot
    assert box is not None
    peak = np.unravel_index(int(np.argmax(finding.heatmap)), finding.heatmap.shape)
    assert box.row_min - 10 <= peak[0] <= box.row_max + 10
    assert box.col_min - 10 <= peak[1] <= box.col_max + 10


def test_the_router_input_is_used_again_when_preprocessing_matches(
    analyzer: Analyzer, radiograph_pixels: Pixels, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boneflow.models.inference as inference

    calls: list[int] = []
    original = inference.preprocess

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(inference, "preprocess", counted)
    rg3 = next(name for name in RADIOGRAPHS if name.startswith("RG3"))
    (finding,) = analyzer.analyse([_input(rg3, radiograph_pixels)])
    assert finding.status == FindingStatus.ANALYSED  # router and fracture model both ran
    assert len(calls) == 1  # the test models share their preprocessing


def test_the_reported_probability_is_the_manifests_calibration_of_the_network(
    tmp_path: Path, radiograph_pixels: Pixels
) -> None:
    """A calibrated version of the same weights: P and the finding follow the calibration."""
    from dataclasses import replace

    from boneflow.models.registry import platt
    from tests.model_fixtures import make_test_models

    make_test_models(tmp_path)
    registry = Registry(tmp_path)
    (raw,) = Analyzer(registry, "cpu").analyse([_input("RG3_UNCR", radiograph_pixels)])
    assert raw.fracture_model is not None and raw.fracture_probability is not None
    leg = registry.load(raw.fracture_model.name)
    scaling = {"scale": 0.5, "offset": -2.0}
    expected = float(platt([raw.fracture_probability], 0.5, -2.0)[0])
    registry.register(
        leg.network,
        replace(leg.manifest, version="2", calibration=scaling, threshold=expected + 0.01),
    )
    (calibrated,) = Analyzer(registry, "cpu").analyse([_input("RG3_UNCR", radiograph_pixels)])
    assert calibrated.fracture_model == ModelId(leg.manifest.name, "2")
    assert calibrated.fracture_probability == pytest.approx(expected, abs=1e-6)
    assert calibrated.fracture_probability != pytest.approx(raw.fracture_probability, abs=0.01)
    assert calibrated.fracture_present is False  # the threshold applies to the calibrated P
    assert calibrated.threshold == pytest.approx(expected + 0.01)
    # a model calibrated per body part: the routed part's own scaling gives P
    assert raw.body_part is not None and raw.body_part in leg.manifest.body_parts
    own = {raw.body_part: {"scale": 1.0, "offset": 3.0}}
    registry.register(
        leg.network,
        replace(leg.manifest, version="3", calibration=scaling, calibration_by_part=own),
    )
    (by_part,) = Analyzer(registry, "cpu").analyse([_input("RG3_UNCR", radiograph_pixels)])
    assert by_part.fracture_model == ModelId(leg.manifest.name, "3")
    assert by_part.body_part == raw.body_part
    own_p = float(platt([raw.fracture_probability], 1.0, 3.0)[0])
    assert by_part.fracture_probability == pytest.approx(own_p, abs=1e-6)


def test_a_mirror_scoring_model_reports_the_score_of_the_image_and_its_mirror_image(
    tmp_path: Path, radiograph_pixels: Pixels
) -> None:
    """A fracnet registered with ``mirror``: P and the heat map come from the averaged maps."""
    from dataclasses import replace

    from boneflow.models.inference import _params
    from boneflow.models.transforms import preprocess

    registry, leg, network = _leg_model_and_a_fracnet(tmp_path, radiograph_pixels, seed=5)
    base = replace(leg, architecture="fracnet", threshold=0.0)
    registry.register(network, replace(base, version="2"))
    registry.register(network, replace(base, version="3", mirror=True))
    assert registry.load(leg.name, "3").network.mirror is True  # type: ignore[union-attr]
    assert registry.load(leg.name, "2").network.mirror is False  # type: ignore[union-attr]

    (mirrored,) = Analyzer(registry, "cpu").analyse([_input("RG3_UNCR", radiograph_pixels)])
    assert mirrored.fracture_model == ModelId(leg.name, "3")
    x, _ = preprocess(radiograph_pixels["RG3_UNCR"], _params(leg))
    network.eval()
    with torch.inference_mode():  # the network alone, on the image, then on its mirror image
        single = [
            float(torch.softmax(network(torch.from_numpy(v[None])), 1)[0, 1])
            for v in (x, x[:, :, ::-1].copy())
        ]
        layers = (network.stem, network.stage2, network.features, network.evidence)
        maps = torch.from_numpy(np.stack([x, x[:, :, ::-1].copy()]))
        for layer in layers:
            maps = layer(maps)
    average = ((maps[0] + maps[1].flip(-1)) / 2).flatten() * network.sharpness
    cells = torch.log(torch.tensor(float(average.numel())))
    z = (torch.logsumexp(average, 0) - cells) / network.sharpness
    assert mirrored.fracture_probability == pytest.approx(float(torch.sigmoid(z)), abs=1e-4)
    assert all(abs(mirrored.fracture_probability - p) > 1e-3 for p in single)
    assert mirrored.heatmap is not None
    assert mirrored.heatmap.shape == radiograph_pixels["RG3_UNCR"].shape
    assert float(mirrored.heatmap.max()) == pytest.approx(1.0, abs=1e-3)


def test_a_tiled_scoring_model_reports_the_score_of_its_tiles(
    tmp_path: Path, radiograph_pixels: Pixels
) -> None:
    """A fracnet registered with ``tile``: the Analyzer scores the image in tiles."""
    from dataclasses import replace

    from boneflow.models.inference import _params
    from boneflow.models.networks import set_mirror, set_tiles
    from boneflow.models.transforms import preprocess

    # the test models take 224 px: tiles of 160 px start at 0 and 64
    registry, leg, network = _leg_model_and_a_fracnet(tmp_path, radiograph_pixels, seed=6)
    base = replace(leg, architecture="fracnet", threshold=0.0, mirror=True)
    registry.register(network, replace(base, version="2"))
    (whole,) = Analyzer(registry, "cpu").analyse([_input("RG3_UNCR", radiograph_pixels)])
    registry.register(network, replace(base, version="3", tile=160, tile_margin=32))
    (tiled,) = Analyzer(registry, "cpu").analyse([_input("RG3_UNCR", radiograph_pixels)])
    assert tiled.fracture_model == ModelId(leg.name, "3")

    x, _ = preprocess(radiograph_pixels["RG3_UNCR"], _params(leg))
    network.eval()
    set_mirror(network, True)
    set_tiles(network, 160, 32)
    with torch.inference_mode():
        expected = float(torch.softmax(network(torch.from_numpy(x[None])), 1)[0, 1])
    assert tiled.fracture_probability == pytest.approx(expected, abs=1e-5)
    assert abs(whole.fracture_probability - expected) > 5e-4  # the whole image scores otherwise
    assert tiled.heatmap is not None
    assert tiled.heatmap.shape == radiograph_pixels["RG3_UNCR"].shape
    assert float(tiled.heatmap.max()) == pytest.approx(1.0, abs=1e-3)


def _leg_model_and_a_fracnet(
    tmp_path: Path, radiograph_pixels: Pixels, seed: int
) -> tuple[Registry, ModelManifest, torch.nn.Module]:
    """The test models, the manifest of the one that scores RG3, and a fresh fracnet."""
    from tests.model_fixtures import make_test_models

    make_test_models(tmp_path)
    registry = Registry(tmp_path)
    (first,) = Analyzer(registry, "cpu").analyse([_input("RG3_UNCR", radiograph_pixels)])
    assert first.fracture_model is not None
    leg = registry.load(first.fracture_model.name).manifest
    torch.manual_seed(seed)
    network = build_network("fracnet", 2)
    with torch.no_grad():  # a sharper evidence map than initialisation gives: scores that differ
        network.evidence.weight.mul_(50.0)  # type: ignore[operator]
    return registry, leg, network
