"""Training really learns, resumes where it stopped, reports and registers (tiny and fast)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from boneflow.cli import main
from boneflow.config import Settings
from boneflow.findings import BODY_PARTS
from boneflow.models.registry import Registry
from boneflow.models.transforms import PreprocessParams
from boneflow.training.datasets import load_records, prepare_dataset
from boneflow.training.demo import DemoPlan, patient_rng
from boneflow.training.engine import (
    EPOCH_LOG,
    FitConfig,
    ImageSet,
    _TimedOneCycle,
    augment_batch,
    build_image_set,
    fit,
    one_cycle_rate,
    predict,
)
from boneflow.training.synth import generate_image, to_display
from boneflow.training.synth_fracture import FRACTURE_TYPES
from boneflow.training.train import ProgressBar, TaskData, task_data, train_and_register

PARTS = ("hand", "lower_leg", "other")  # three clearly different shapes
SIZE = 64
CPU = torch.device("cpu")


def _synthetic_set(split: str, count: int) -> ImageSet:
    """Router data for three parts from held-out synthetic patients (one stream each)."""
    images, labels = [], []
    for i in range(count):
        part = PARTS[i % len(PARTS)]
        image = generate_image(patient_rng(7, split, i), part, False, 96)
        images.append(to_display(image))
        labels.append(PARTS.index(part))
    params = PreprocessParams(input_size=SIZE)
    return build_image_set(images, labels, params, [PARTS[y] for y in labels])


@pytest.fixture(scope="module")
def router_data() -> dict[str, ImageSet]:
    return {
        "train": _synthetic_set("train", 96),
        "val": _synthetic_set("val", 30),
        "test": _synthetic_set("test", 45),
    }


CONFIG = FitConfig(
    architecture="resnet10",
    num_classes=len(PARTS),
    epochs=4,
    batch_size=16,
    learning_rate=3e-3,
    optimizer="adamw",
    seed=3,
    monitor="accuracy",
    schedule="cosine",
    early_stop_patience=100,
)


def test_tiny_training_run_learns_on_held_out_synthetic_patients(
    router_data: dict[str, ImageSet], tmp_path: Path
) -> None:
    result = fit(CONFIG, router_data["train"], router_data["val"], tmp_path, CPU)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.6 * losses[0], losses
    probs = predict(result.network, router_data["test"], CPU)
    accuracy = float((probs.argmax(1) == router_data["test"].labels).mean())
    assert accuracy >= 0.6, f"accuracy {accuracy:.2f} on held-out patients (chance 0.33)"
    lines = (tmp_path / EPOCH_LOG).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


def test_resume_continues_exactly_where_training_stopped(
    router_data: dict[str, ImageSet], tmp_path: Path
) -> None:
    train, val = router_data["train"], router_data["val"]
    # float32 throughout: on a CPU with bfloat16 an epoch validates under autocast unless it
    # is its run's last, so the cut run's epoch 1 (its last) would validate otherwise
    short = replace(CONFIG, epochs=2, schedule="plateau", mixed_precision=False)
    whole = fit(short, train, val, tmp_path / "whole", CPU)
    fit(replace(short, epochs=1), train, val, tmp_path / "cut", CPU)
    resumed = fit(short, train, val, tmp_path / "cut", CPU, resume=True)
    assert len(resumed.history) == 2
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    lines = (tmp_path / "cut" / EPOCH_LOG).read_text().splitlines()
    assert len(lines) == 2  # the log continues instead of restarting


def test_timed_schedule_follows_the_clock_and_resumes() -> None:
    now = [0.0]
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1.0)
    schedule = _TimedOneCycle(optimizer, 1.0, total_steps=1000, seconds=100.0, clock=lambda: now[0])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0 / 25)
    now[0] = 15.0  # the end of the warm-up by the clock, after only 10 of 1000 steps
    for _ in range(10):
        schedule.step()
    assert schedule.progress == pytest.approx(0.15)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0)
    now[0] = 57.5
    state = schedule.state_dict()
    resumed = _TimedOneCycle(optimizer, 1.0, total_steps=1000, seconds=100.0, clock=lambda: now[0])
    resumed.load_state_dict(state)
    assert resumed.progress == pytest.approx(0.575) and not resumed.done
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5, abs=1e-3)  # half-way down
    now[0] = 100.0
    resumed.step()
    assert resumed.done
    assert optimizer.param_groups[0]["lr"] == pytest.approx(one_cycle_rate(1.0, 1.0))
    assert one_cycle_rate(1.0, 1.0) < 1e-4  # annealed when the time is up


def test_timed_schedule_stops_rather_than_start_a_stub_epoch() -> None:
    now = [0.0]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    clock = lambda: now[0]  # noqa: E731
    schedule = _TimedOneCycle(optimizer, 1.0, total_steps=10**6, seconds=100.0, clock=clock)
    now[0] = 88.0
    assert not schedule.ends_before(20.0)  # 12 s left: more than half a 20 s epoch
    now[0] = 91.0
    assert schedule.ends_before(20.0)  # 9 s left: the next epoch would be a stub
    assert not schedule.ends_before(10.0)  # ... unless epochs are short
    now[0] = 100.0
    assert schedule.ends_before(0.0)  # the time is spent


def test_timed_run_stops_annealed_and_validates_only_late(
    router_data: dict[str, ImageSet], tmp_path: Path
) -> None:
    config = replace(CONFIG, epochs=1000, schedule="timed", max_minutes=0.25, validate_from=0.5)
    result = fit(config, router_data["train"], router_data["val"], tmp_path, CPU)
    assert result.stopped == "time-limit" and 2 <= len(result.history) < 1000
    assert result.seconds < 0.25 * 60 + 10  # the last epoch is cut short, one validation added
    last = result.history[-1]
    # ended annealed: it stopped with less than half its last epoch's time left (or none),
    # so its rate is at most the schedule's there - a small share of the peak, however
    # fast this machine is at the moment ("seconds" includes the validation: an upper bound)
    left = last["seconds"] / 2 / (config.max_minutes * 60)
    assert last["learning_rate"] <= one_cycle_rate(1.0 - left, CONFIG.learning_rate) * 1.001
    assert last["learning_rate"] < 0.05 * CONFIG.learning_rate
    assert "val_accuracy" in last  # the last epoch always validates
    assert "val_accuracy" not in result.history[0]  # early epochs skip validation
    assert "val_accuracy" in result.history[result.best_epoch - 1]
    probs = predict(result.network, router_data["test"], CPU)
    assert float((probs.argmax(1) == router_data["test"].labels).mean()) >= 0.6


def test_fit_hands_over_the_kept_epochs_validation_probabilities(
    router_data: dict[str, ImageSet], tmp_path: Path
) -> None:
    # float32 validation is what the final pass computes: train_and_register reuses it
    config = replace(CONFIG, epochs=3, mixed_precision=False)
    result = fit(config, router_data["train"], router_data["val"], tmp_path, CPU)
    assert result.val_probabilities is not None
    again = predict(result.network, router_data["val"], CPU, config.batch_size)
    np.testing.assert_allclose(result.val_probabilities, again, atol=1e-6)


def test_augmentation_moves_the_fracture_mask_with_the_image() -> None:
    image = torch.zeros(4, 1, 32, 32)
    image[:, :, 10:12, 5:25] = 1.0
    augmented, mask, _ = augment_batch(image, torch.Generator().manual_seed(0), image.clone())
    assert mask is not None
    # same geometry: where the (unaltered-intensity) mask is, the image is bright too
    assert float((augmented * (mask > 0.5)).sum()) > 0
    assert torch.allclose((mask > 0.5).float().sum(), (augmented > 0.3).float().sum(), rtol=0.5)


def test_masks_are_drawn_on_the_input_grid() -> None:
    image = np.zeros((100, 200), dtype=np.float32)
    image[40:60, :] = 1.0
    data = build_image_set(
        [image], [1], PreprocessParams(input_size=64), ["wrist"], segments=[(20, 50, 180, 50)]
    )
    assert data.masks is not None
    rows, cols = np.nonzero(data.masks[0])
    assert 28 <= rows.mean() <= 36  # the image is padded vertically: row 50 of 100 -> ~32
    assert cols.min() < 12 and cols.max() > 52


def test_fracnet_learns_its_evidence_map_from_the_mask_without_an_extra_head(
    tmp_path: Path,
) -> None:
    """FractureNet's own evidence map is the localisation target: no head is added."""
    rng = np.random.default_rng(0)
    images, labels, segments = [], [], []
    for i in range(64):
        image = (0.4 + 0.05 * rng.standard_normal((64, 64))).astype(np.float32)
        broken = i % 2 == 0
        if broken:
            row = int(rng.integers(12, 52))
            image[row : row + 2, 8:56] = 0.0  # a dark line across the image
        images.append(np.clip(image, 0, 1))
        labels.append(int(broken))
        segments.append((8.0, row + 0.5, 55.0, row + 0.5) if broken else None)
    data = build_image_set(
        images, labels, PreprocessParams(input_size=64), ["wrist"] * 64, segments=segments
    )
    config = FitConfig(
        architecture="fracnet",
        num_classes=2,
        epochs=3,
        batch_size=16,
        learning_rate=3e-3,
        optimizer="adamw",
        loss="weighted-ce",
        schedule="cosine",
        augment=False,
        early_stop_patience=100,
        localisation_weight=1.0,
    )
    result = fit(config, data, data, tmp_path, CPU)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert "localiser" not in state  # supervised on the network's own evidence layer
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert set(result.network.state_dict()) == set(state["model"])


def test_train_and_register_writes_report_and_a_loadable_model(
    router_data: dict[str, ImageSet], tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path)
    data = TaskData(
        "router", PARTS, PARTS, router_data["train"], router_data["val"], router_data["test"]
    )
    manifest = train_and_register(
        settings,
        "router",
        data,
        replace(CONFIG, epochs=2),
        PreprocessParams(input_size=SIZE),
        "fingerprint-1",
        {"source": "test"},
    )
    assert manifest.model_id == "router@1" and manifest.input_size == SIZE
    assert 0.3 <= manifest.threshold <= 0.9
    assert "accuracy" in manifest.metrics and manifest.training["epochs"] == 2
    loaded = Registry(settings.resolved_model_dir).load("router")
    assert loaded.manifest.labels == PARTS
    report = tmp_path / "reports" / "router-1"
    for name in (
        "metrics.json",
        "roc.png",
        "confusion.png",
        "calibration.png",
        "learning_curves.png",
        "model_card.md",
    ):
        assert (report / name).stat().st_size > 0, name
    assert cv2.imread(str(report / "roc.png")) is not None
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["metrics"]["n"] == 45 and len(metrics["history"]) == 2
    assert "Not for diagnostic use" in (report / "model_card.md").read_text()


def test_cli_trains_and_evaluates_a_folder_data_set(tmp_path: Path) -> None:
    """``boneflow train --format folders`` then ``boneflow evaluate`` on the same tree."""
    root = tmp_path / "data"
    for split, count in (("train", 24), ("val", 9), ("test", 9)):
        for i in range(count):
            part = ("hand", "other")[i % 2]
            image = generate_image(patient_rng(11, split, i), part, False, 96)
            path = root / split / part / f"p{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.rint(to_display(image) * 255).astype(np.uint8))
    common = ["--data-dir", str(tmp_path / "node"), "--data", str(root), "--format", "folders"]
    code = main(
        [
            "train",
            *common,
            "--task",
            "router",
            "--arch",
            "resnet10",
            "--image-size",
            "48",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--report",
            str(tmp_path / "rep"),
        ]
    )
    assert code == 0
    manifest = Registry(tmp_path / "node" / "models").manifest("router")
    assert manifest.labels == ("hand", "other")
    assert (tmp_path / "rep" / "router-1" / "model_card.md").is_file()
    code = main(
        ["evaluate", "router", *common, "--split", "test", "--report", str(tmp_path / "eval")]
    )
    assert code == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["metrics"]["n"] == 9


def test_train_without_data_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--data-dir", str(tmp_path)]) == 1
    assert "--data is required" in capsys.readouterr().err


def test_demo_plan_fingerprint_names_the_data_not_the_epochs() -> None:
    plan = DemoPlan()
    assert plan.fingerprint() == replace(plan, router_epochs=99).fingerprint()
    assert plan.fingerprint() != replace(plan, seed=1).fingerprint()
    assert len(BODY_PARTS) == 8


def test_demo_images_are_the_same_from_one_process_or_a_pool() -> None:
    from boneflow.training.demo import _generator_pool, _make_split
    from boneflow.training.train import ProgressBar

    plan = DemoPlan(source_size=96)
    params = PreprocessParams(input_size=48)
    serial = _make_split(plan, "val", 24, params, params, ProgressBar(None), chunk=8)
    with _generator_pool() as pool:
        pooled = _make_split(plan, "val", 24, params, params, ProgressBar(None), pool, chunk=8)
    for one, other in zip(serial, pooled, strict=True):
        assert np.array_equal(one.images, other.images)
        assert np.array_equal(one.labels, other.labels)
        assert one.body_parts == other.body_parts and one.difficulties == other.difficulties
    assert serial[1].masks is not None and pooled[1].masks is not None
    assert np.array_equal(serial[1].masks, pooled[1].masks)


def test_demo_keeps_the_anatomy_maps_of_training_images_only_when_asked() -> None:
    from boneflow.training.demo import _make_split
    from boneflow.training.train import ProgressBar

    params = PreprocessParams(input_size=64)
    off = DemoPlan(source_size=96)
    on = replace(off, anatomy_weight=1.0)
    split = {
        (plan.anatomy_weight, name): _make_split(plan, name, 16, params, params, ProgressBar(None))[
            1
        ]
        for plan in (off, on)
        for name in ("train", "val")
    }
    kept = split[(1.0, "train")].anatomy
    assert kept is not None and kept.shape == split[(1.0, "train")].images.shape
    assert set(np.unique(kept).tolist()) >= {0, 1, 2}  # background, bone, overlaps
    # where the map says bone, the (CLAHE'd) image is brighter than where it says none
    images = split[(1.0, "train")].images
    assert images[kept == 1].mean() > images[kept == 0].mean()
    assert split[(0.0, "train")].anatomy is None  # off: 1 GB not held for nothing
    assert split[(1.0, "val")].anatomy is None  # never for validation or test
    assert np.array_equal(images, split[(0.0, "train")].images)  # the images do not change


def test_train_demo_models_registers_a_router_and_a_fracture_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The function ``boneflow demo`` calls, on a tiny plan (the real one takes minutes)."""
    from boneflow.training import metrics

    # this plan's validation split has ~2 images per part: let one of each class suffice
    monkeypatch.setattr(metrics, "PART_CALIBRATION_MIN", 1)
    plan = DemoPlan(
        images=(48, 16, 32),
        source_size=96,
        router_size=48,
        fracture_size=64,
        router_epochs=1,
        fracture_epochs=1,
        fracture_crop=32,
        batch_size=16,
    )
    from boneflow.training.demo import demo_test_set, train_demo_models

    settings = Settings(data_dir=tmp_path)
    router, fracture = train_demo_models(settings, progress=False, plan=plan)
    assert (router.task, router.labels) == ("router", BODY_PARTS)
    assert router.architecture == plan.router_architecture == "resnet10-slim"
    assert fracture.task == "fracture" and "other" not in fracture.body_parts
    assert set(fracture.body_parts) == set(BODY_PARTS) - {"other"}
    assert fracture.training["localisation_weight"] == plan.localisation_weight == 3.0
    assert fracture.training["crop_size"] == 32
    # one cycle over the time limit; this tiny plan ends by its epoch count, validated
    assert fracture.training["schedule"] == router.training["schedule"] == "timed"
    assert fracture.training["stopped"] == "epochs" and fracture.training["epochs_run"] == 1
    assert fracture.training["validate_from"] == plan.fracture_validate_from
    assert fracture.training["max_minutes"] == plan.fracture_max_minutes  # fast: full limit
    assert fracture.training["hard_negatives"] == plan.fracture_hard_negatives == 0.5
    # rotated views: this machine affords their passes here (tiny images), so they are on,
    # measured with them and registered with them
    assert fracture.rotation == fracture.training["rotation"] == plan.fracture_rotation == 6.0
    # P(fracture) is calibrated on validation; the router reports its softmax as it is
    assert set(fracture.calibration) == {"scale", "offset"} and fracture.calibration["scale"] > 0
    assert router.calibration == {}
    # ... and on each part's own scale where its validation images allow
    assert fracture.calibration_by_part and router.calibration_by_part == {}
    assert set(fracture.calibration_by_part) <= set(fracture.body_parts)
    assert "ece_uncalibrated" in fracture.metrics and "ece_uncalibrated" not in router.metrics
    card = (tmp_path / "reports" / "fracture-limbs-1" / "model_card.md").read_text()
    assert "Platt scaling fitted on validation" in card
    assert "body parts calibrated on their own" in card
    # synthetic data name their fracture types: the report breaks the results down by type
    report = json.loads((tmp_path / "reports" / "fracture-limbs-1" / "metrics.json").read_text())
    by_type = report["metrics"]["by_fracture_type"]
    assert by_type and set(by_type) <= set(FRACTURE_TYPES)
    assert "Per fracture type" in card
    registry = Registry(settings.resolved_model_dir)
    assert registry.router().model_id == "router@1"
    # the half-width router loads strictly from its safetensors, as the worker loads it
    slim = registry.load("router").network
    assert dict(slim.named_modules())["layer4.0.conv2"].out_channels == 256
    assert registry.load(fracture.name).network.rotation == 6.0
    covering = registry.fracture_model_for("wrist")
    assert covering is not None and covering.model_id == fracture.model_id
    assert registry.fracture_model_for("other") is None
    # the held-out test set is rebuilt from the manifest alone (for boneflow evaluate)
    test = demo_test_set(fracture, PreprocessParams(input_size=64))
    assert len(test) == fracture.training["images"]["test"]
    assert set(test.difficulties) <= {"none", "easy", "moderate", "hard"}
    # ... and `boneflow evaluate` on it reproduces the registered test figures, each
    # image's probability on its own part's scale as in training and at inference
    from boneflow.training.evaluate import summary
    from boneflow.training.options import EvaluateOptions
    from boneflow.training.train import evaluate_registered

    again = evaluate_registered(
        settings, registry.load(fracture.name), EvaluateOptions(fracture.name)
    )
    for key in ("roc_auc", "sensitivity", "specificity", "ece"):
        assert summary(again)[key] == pytest.approx(fracture.metrics[key], abs=1e-6)


def test_synth_fracture_lines_become_masks_on_bone(tmp_path: Path) -> None:
    """``boneflow synth`` labels.csv locations are drawn where the fractured bone is."""
    root = tmp_path / "synth"
    assert main(["synth", "--out", str(root), "--count", "48", "--seed", "3", "--size", "256",
                 "--parts", "forearm,humerus,lower_leg", "--format", "png"]) == 0  # fmt: skip
    records = load_records("synth", root)
    prepared = prepare_dataset(records, source="synth", seed=0)
    data = task_data(prepared, "fracture", PreprocessParams(input_size=128), ProgressBar(None))
    located = 0
    for split in (data.train, data.val, data.test):
        assert split.masks is not None
        for image, mask, label in zip(split.images, split.masks, split.labels, strict=True):
            if label == 0:
                assert not mask.any()  # no line on a sound bone
                continue
            assert mask.any()
            # On the input grid, the line lies on bone: brighter than the image around it.
            located += int(image[mask > 0].mean() > image.mean() + 20)
    fractured = sum(int(s.labels.sum()) for s in (data.train, data.val, data.test))
    assert fractured >= 10
    assert located >= 0.9 * fractured


def test_cli_trains_fracnet_on_crops_of_synth_data(tmp_path: Path) -> None:
    root = tmp_path / "synth"
    assert main(["synth", "--out", str(root), "--count", "40", "--seed", "5", "--size", "192",
                 "--parts", "forearm,other", "--format", "png"]) == 0  # fmt: skip
    common = ["--data-dir", str(tmp_path / "node"), "--data", str(root), "--format", "synth"]
    args = ["train", *common, "--task", "fracture", "--image-size", "96", "--epochs", "2",
            "--batch-size", "8", "--optimizer", "adamw", "--loss", "weighted-ce"]  # fmt: skip
    tiles = ["--tile", "64", "--tile-margin", "16"]  # 96 px images: two tiles a side
    turned = ["--rotation", "6"]
    assert main([*args, "--arch", "fracnet", "--crop", "48", "--mirror", *tiles, *turned]) == 0
    manifest = Registry(tmp_path / "node" / "models").manifest("fracture-synth")
    assert manifest.architecture == "fracnet"
    assert manifest.training["crop_size"] == 48
    assert manifest.mirror is True and manifest.training["mirror"] is True
    assert (manifest.tile, manifest.tile_margin) == (64, 16) and manifest.training["tile"] == 64
    assert manifest.rotation == 6.0 and manifest.training["rotation"] == 6.0
    # labels.csv names each fracture's type: the report of a synth data set breaks them down
    report = tmp_path / "node" / "reports" / f"fracture-synth-{manifest.version}" / "metrics.json"
    by_type = json.loads(report.read_text())["metrics"]["by_fracture_type"]
    assert by_type and set(by_type) <= set(FRACTURE_TYPES)
    # Crops need a network that scores whole images, and located fractures.
    assert main([*args, "--arch", "resnet10", "--crop", "48"]) == 1
    # Mirror scoring needs a network that averages evidence maps.
    assert main([*args, "--arch", "resnet10", "--mirror"]) == 1
    # Tiles need such a network too, and must lie on its grid of 8 px cells.
    assert main([*args, "--arch", "resnet10", "--tile", "64"]) == 1
    assert main([*args, "--arch", "fracnet", "--crop", "48", "--tile", "60"]) == 1
    # Rotated views too, and only small turns.
    assert main([*args, "--arch", "resnet10", "--rotation", "6"]) == 1
    assert main([*args, "--arch", "fracnet", "--crop", "48", "--rotation", "90"]) == 1
    assert main(["train", "--data-dir", str(tmp_path / "node"), "--data", str(root / "x"),
                 "--format", "synth", "--task", "fracture", "--crop", "48"]) == 1  # fmt: skip


def test_the_fracture_model_gets_what_is_left_of_the_demo_budget() -> None:
    from boneflow.training.demo import fracture_minutes

    plan = DemoPlan()
    # a fast machine: generation and router took 1.2 minutes, its scoring passes will take
    # half a minute: 8 minutes are left, the ceiling holds
    assert fracture_minutes(plan, 1.2, 0.5) == plan.fracture_max_minutes == 7.5
    # generation and router 1.5 minutes, passes 1 minute: 7.2 left, all of it
    assert fracture_minutes(plan, 1.5, 1.0) == pytest.approx(7.2)
    # a slow one: 3.5 minutes gone and 1.6 for the passes: 10 - 3.5 - 1.6 - 0.3 = 4.6 left
    assert fracture_minutes(plan, 3.5, 1.6) == pytest.approx(4.6)
    # never below the minimum, however slow the start
    assert fracture_minutes(plan, 9.0, 1.0) == plan.fracture_min_minutes


def test_the_demo_keeps_rotated_views_only_where_training_keeps_its_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import time

    from boneflow.models.registry import FRACTURE_LABELS
    from boneflow.training.demo import _config, _fracture_budget

    pixels = np.random.default_rng(0).integers(0, 256, (8, 64, 64), dtype=np.uint8)
    images = ImageSet(pixels, np.array([0, 1] * 4), ("hand",) * 8, ("none",) * 8)
    data = TaskData("fracture", FRACTURE_LABELS, ("hand",), images, images, images)
    settings = Settings(data_dir=tmp_path)
    plan = DemoPlan(fracture_size=64)
    config = _config(plan, "fracture")
    assert config.rotation == 6.0 and config.mirror
    # 16 small images to score: the fracture model keeps its ceiling, and the views
    kept = _fracture_budget(plan, config, data, settings, time.monotonic())
    assert (kept.rotation, kept.max_minutes) == (6.0, plan.fracture_max_minutes)
    # asked for more training than the views would leave: one view
    slow = replace(plan, rotation_min_minutes=plan.fracture_max_minutes + 0.1)
    with caplog.at_level(logging.INFO, logger="boneflow.training.demo"):
        dropped = _fracture_budget(slow, config, data, settings, time.monotonic())
    assert (dropped.rotation, dropped.max_minutes) == (0.0, plan.fracture_max_minutes)
    assert dropped.mirror and "rotated views would leave" in caplog.text
    # a plan without them never asks
    assert _config(replace(plan, fracture_rotation=0.0), "fracture").rotation == 0.0


def test_a_timed_training_bar_follows_the_clock_and_ends_full() -> None:
    from rich.progress import Progress

    display = Progress(disable=True)
    now = [100.0]
    step, finish = ProgressBar(display).training_stage("fracture", 200, 60.0, lambda: now[0])
    (task,) = display.tasks
    for _ in range(10):  # 10 of 200 batches and no time gone yet: 5 %
        step()
    assert task.completed == 10
    now[0] += 30.0
    step()
    assert task.completed == pytest.approx(100)  # the time share: 30 of 60 s
    now[0] += 300.0
    step()
    assert task.completed == 200  # never past the end
    untimed, _ = ProgressBar(display).training_stage("router", 40, None, lambda: now[0])
    now[0] += 1000.0
    untimed()
    assert display.tasks[1].completed == 1  # without a limit: batches only
    finish()
    assert task.completed == task.total == 200
