"""Training on crops around the fracture line, validated and used on whole images."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from boneflow.models.transforms import PreprocessParams
from boneflow.training.engine import (
    CHECKPOINT,
    EPOCH_LOG,
    FitConfig,
    ImageSet,
    _Cropper,
    _PartBalance,
    build_image_set,
    fit,
    predict,
)

CPU = torch.device("cpu")
SIZE = 96


def _line_set(count: int, seed: int, part: str = "wrist", line: float = 0.05) -> ImageSet:
    """Noisy images; every second one has a short dark line at a random place (its mask).

    ``line``: the line's grey value (0.05 plain on the 0.5 background, nearer 0.5 faint).
    """
    rng = np.random.default_rng(seed)
    images, labels, segments = [], [], []
    for i in range(count):
        image = (0.5 + 0.06 * rng.standard_normal((SIZE, SIZE))).astype(np.float32)
        segment = None
        if i % 2 == 0:
            row, col = (int(v) for v in rng.integers(10, SIZE - 30, size=2))
            image[row : row + 2, col : col + 18] = line
            segment = (col + 0.5, row + 0.5, col + 17.5, row + 0.5)
        images.append(np.clip(image, 0, 1))
        labels.append(int(segment is not None))
        segments.append(segment)
    return build_image_set(
        images, labels, PreprocessParams(input_size=SIZE), [part] * count, segments=segments
    )


CONFIG = FitConfig(
    architecture="fracnet",
    num_classes=2,
    epochs=6,
    batch_size=16,
    learning_rate=3e-3,
    optimizer="adamw",
    loss="weighted-ce",
    schedule="cosine",
    early_stop_patience=100,
    localisation_weight=1.0,
    crop_size=48,
)


def test_crops_are_labelled_by_the_line_they_hold() -> None:
    data = _line_set(40, seed=0)
    cropper = _Cropper.create(data, CONFIG)
    assert cropper is not None
    crops = cropper.crops(np.arange(len(data)).repeat(5))
    assert crops.images.shape == (200, 48, 48) and crops.masks is not None
    holds_line = np.count_nonzero(crops.masks, axis=(1, 2)) >= _Cropper.MIN_LINE_PIXELS
    assert np.array_equal(crops.labels, holds_line.astype(np.int64))
    # a positive crop shows the dark line; only fractured images give positive crops
    assert crops.images[crops.labels == 1].min(axis=(1, 2)).max() < 40
    sources = np.arange(len(data)).repeat(5)
    assert not crops.labels[data.labels[sources] == 0].any()
    # most crops of a fractured image are on its line, and negatives are common too
    assert 0.4 < crops.labels[data.labels[sources] == 1].mean() < 0.9
    assert crops.labels.mean() < 0.5


def test_crop_training_learns_and_scores_whole_images(tmp_path: Path) -> None:
    train, val = _line_set(96, seed=1), _line_set(48, seed=2)
    result = fit(CONFIG, train, val, tmp_path, CPU)
    probabilities = predict(result.network, val, CPU)
    assert probabilities.shape == (48, 2)  # whole 96 px images, trained on 48 px crops
    assert roc_auc_score(val.labels, probabilities[:, 1]) > 0.9
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_hard_negatives_are_mined_away_from_the_line() -> None:
    data = _line_set(32, seed=3)
    cropper = _Cropper.create(data, CONFIG)
    assert cropper is not None
    from boneflow.models.networks import build_network
    from boneflow.training.engine import _Localiser

    network = build_network("fracnet", 2)
    localiser = _Localiser(network, CONFIG, data, CPU)
    cropper.mine(network, localiser, CPU)
    localiser.close()
    assert cropper.hard, "an untrained network's peaks are false alarms somewhere"
    guard = CONFIG.crop_size // 4
    assert data.masks is not None
    for i, y, x in cropper.hard:
        assert not data.masks[i, max(0, y - guard) : y + guard, max(0, x - guard) : x + guard].any()


def test_mining_takes_several_separate_peaks_per_image(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _line_set(32, seed=3)
    from boneflow.models.networks import build_network
    from boneflow.training.engine import _Localiser

    network = build_network("fracnet", 2)
    found = {}
    for peaks in (1, 3):
        monkeypatch.setattr(_Cropper, "PEAKS", peaks)
        cropper = _Cropper.create(data, CONFIG)
        assert cropper is not None
        localiser = _Localiser(network, CONFIG, data, CPU)
        cropper.mine(network, localiser, CPU)
        localiser.close()
        found[peaks] = cropper.hard
    assert len(found[1]) <= len(data) < len(found[3]) <= 3 * len(data)
    guard = CONFIG.crop_size // 4
    for i in {i for i, _, _ in found[3]}:
        spots = [(y, x) for j, y, x in found[3] if j == i]
        assert len(spots) <= 3
        for a, (y0, x0) in enumerate(spots):  # a quarter crop apart, never on the line
            assert data.masks is not None
            assert not data.masks[
                i, max(0, y0 - guard) : y0 + guard, max(0, x0 - guard) : x0 + guard
            ].any()
            for y1, x1 in spots[a + 1 :]:
                assert max(abs(y0 - y1), abs(x0 - x1)) >= guard


def test_without_masks_crop_size_is_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = _line_set(8, seed=4)
    bare = ImageSet(data.images, data.labels, data.body_parts, data.difficulties, masks=None)
    with caplog.at_level(logging.WARNING):
        assert _Cropper.create(bare, CONFIG) is None
    assert "no fracture masks" in caplog.text


@pytest.mark.parametrize("native_bf16", [True, False])
def test_training_autocasts_to_bf16_only_on_a_bf16_cpu_and_keeps_fp32_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native_bf16: bool
) -> None:
    # Which CPU this runs on must not decide what is tested: pretend to have native bf16
    # (or not); on a CPU without it torch emulates bf16, slowly but correctly.
    from boneflow.training import engine

    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: native_bf16)
    seen: set[torch.dtype] = set()
    layouts: set[bool] = set()  # channels-last, per convolution input (training and scoring)
    scored: list[torch.dtype] = []
    forward = torch.nn.Conv2d.forward

    def recording(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        out = forward(self, x)
        if self.training and torch.is_grad_enabled():
            seen.add(out.dtype)
        if not self.training:  # scoring: mining, validation, predict()
            scored.append(out.dtype)
        if self.in_channels > 1:  # a 1-channel input is both layouts at once
            layouts.add(x.is_contiguous(memory_format=torch.channels_last))
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", recording)
    train, val = _line_set(32, seed=5), _line_set(16, seed=6)
    config = FitConfig(**{**CONFIG.to_dict(), "epochs": 2})  # type: ignore[arg-type]
    result = fit(config, train, val, tmp_path, CPU)
    assert seen == ({torch.bfloat16} if native_bf16 else {torch.float32})
    assert {p.dtype for p in result.network.parameters()} == {torch.float32}
    # mining and validation during training share its precision (bf16 halves a scan) ...
    assert (torch.bfloat16 in scored) is native_bf16
    # ... while predict(), what tests, reports and infers, stays float32 on a CPU
    scored.clear()
    predict(result.network, val, CPU)
    assert scored and set(scored) == {torch.float32}
    # channels-last on a CPU in both precisions: oneDNN's fast layout for float32 too
    assert layouts == {True}
    weights = [m.weight for m in result.network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert np.isfinite([h["train_loss"] for h in result.history]).all()
    probabilities = predict(result.network, val, CPU)
    assert probabilities.dtype == np.float32 and np.isfinite(probabilities).all()


def test_the_last_validation_is_the_final_pass_even_under_bf16_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pretend native bf16: training and mining autocast, the last validation does not, so
    # its probabilities are what predict() gives and the final pass need not run again
    from boneflow.training import engine

    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: True)
    train, val = _line_set(32, seed=5), _line_set(16, seed=6)
    config = replace(CONFIG, epochs=2, validate_from=1.0)
    result = fit(config, train, val, tmp_path, CPU)
    assert [("val_auc" in line) for line in result.history] == [False, True]
    assert result.val_probabilities is not None
    np.testing.assert_allclose(
        result.val_probabilities, predict(result.network, val, CPU), atol=1e-6
    )


def test_mirror_scoring_validates_with_the_mirror_image_and_mines_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows: list[int] = []  # batch rows of every scoring pass (network in eval mode)
    from boneflow.models.networks import FractureNet

    forward = FractureNet.forward

    def recording(self: FractureNet, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            rows.append(x.shape[0] * (2 if self.mirror else 1))
        return forward(self, x)

    monkeypatch.setattr(FractureNet, "forward", recording)
    train, val = _line_set(32, seed=5), _line_set(10, seed=6)
    config = replace(CONFIG, epochs=2, validate_from=1.0, mirror=True)
    result = fit(config, train, val, tmp_path, CPU)
    assert isinstance(result.network, FractureNet) and result.network.mirror
    # the localiser's probe (1 image, 2 rows), mining after epoch 1 (single images, 16 at a
    # time), the last validation (10 images and their mirror images)
    assert rows[0] == 2 and rows[-1] == 20
    assert set(rows[1:-1]) <= {16} and rows[1:-1]
    assert result.val_probabilities is not None
    flipped = ImageSet(val.images[:, :, ::-1].copy(), val.labels, val.body_parts, val.difficulties)
    np.testing.assert_allclose(
        predict(result.network, flipped, CPU), result.val_probabilities, atol=1e-5
    )


def test_the_scoring_passes_are_timed_with_the_network_that_will_run_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from boneflow.models.networks import FractureNet
    from boneflow.training.engine import scoring_seconds

    passes: list[tuple[int, bool, bool]] = []  # rows, mirror scoring, channels-last weights
    forward = FractureNet.forward

    def recording(self: FractureNet, x: torch.Tensor) -> torch.Tensor:
        weight = self.stem[1][0].weight  # (a 1-channel weight is both layouts)
        passes.append(
            (x.shape[0], self.mirror, weight.is_contiguous(memory_format=torch.channels_last))
        )
        return forward(self, x)

    monkeypatch.setattr(FractureNet, "forward", recording)
    data = _line_set(24, seed=8)  # real-looking images: an all-zero batch is slower
    seconds = scoring_seconds(replace(CONFIG, mirror=True), data, CPU, sample=12)
    assert 0 < seconds < 5
    # warm-up passes, then the timed sample, with the network the run will register
    assert passes == [(12, True, True), (12, True, True)]
    passes.clear()
    scoring_seconds(replace(CONFIG, batch_size=4), data, CPU, sample=12)
    assert [rows for rows, _, _ in passes] == [4, 4, 4, 4, 4]  # two to warm up, three timed


def _anatomy_set(count: int, seed: int, width: int = SIZE) -> tuple[ImageSet, list[np.ndarray]]:
    """A bright bar (class 1) and a brighter square (class 2) on dark noise, per image."""
    rng = np.random.default_rng(seed)
    images, maps = [], []
    for _ in range(count):
        image = (0.2 + 0.04 * rng.standard_normal((SIZE, width))).astype(np.float32)
        classes = np.zeros((SIZE, width), np.uint8)
        row, col = (int(v) for v in rng.integers(8, SIZE - 40, size=2))
        image[row : row + 8, 4 : width - 4] = 0.6
        classes[row : row + 8, 4 : width - 4] = 1
        image[col : col + 24, col : col + 24] = 0.95
        classes[col : col + 24, col : col + 24] = 2
        images.append(np.clip(image, 0, 1))
        maps.append(classes)
    data = build_image_set(
        images,
        [0] * count,
        PreprocessParams(input_size=SIZE),
        ["wrist"] * count,
        segments=[None] * count,
        anatomy=maps,
    )
    return data, maps


def test_anatomy_lands_on_the_input_grid_and_in_every_crop() -> None:
    data, maps = _anatomy_set(6, seed=5, width=72)  # padded 12 px a side to 96 px
    assert data.anatomy is not None and data.anatomy.shape == (6, SIZE, SIZE)
    assert not data.anatomy[:, :, :12].any() and not data.anatomy[:, :, -12:].any()
    assert np.array_equal(data.anatomy[:, :, 12:84], np.stack(maps))
    # the class map follows the pixels: the square (class 2) is brighter than the rest
    assert data.images[data.anatomy == 2].mean() > data.images[data.anatomy == 0].mean() + 50
    # every crop carries the class map of its own pixels (here: a function of them)
    marked = replace(data, anatomy=(data.images >= 128).astype(np.uint8))
    cropper = _Cropper.create(marked, CONFIG)
    assert cropper is not None
    crops = cropper.crops(np.arange(len(data)).repeat(4))
    assert crops.anatomy is not None and crops.anatomy.shape == crops.images.shape
    assert np.array_equal(crops.anatomy, (crops.images >= 128).astype(np.uint8))


def test_the_anatomy_head_learns_and_stays_out_of_the_network(tmp_path: Path) -> None:
    from boneflow.models.networks import build_network

    train, _ = _anatomy_set(64, seed=6)
    val = _line_set(16, seed=7)
    config = replace(CONFIG, anatomy_weight=1.0, localisation_weight=0.0, epochs=8)
    result = fit(config, train, val, tmp_path, CPU)
    plain = build_network("fracnet", 2).state_dict()
    assert result.network.state_dict().keys() == plain.keys()  # nothing of the head
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    head = torch.nn.Conv2d(64, 4, kernel_size=1)
    head.load_state_dict(state["anatomist"])
    # on unseen images the head tells bar, square and background apart, cell by cell
    test, _ = _anatomy_set(8, seed=8)
    assert test.anatomy is not None
    cells = {}
    hook = result.network.cells.register_forward_hook(lambda _m, _i, out: cells.update(x=out))
    with torch.no_grad():
        result.network(torch.from_numpy(test.images).float().div(255).unsqueeze(1))
        predicted = head(cells["x"]).argmax(1).numpy()
    hook.remove()
    target = torch.nn.functional.adaptive_max_pool2d(
        torch.from_numpy(test.anatomy).float().unsqueeze(1), predicted.shape[-2:]
    )[:, 0].numpy()
    for label in (0, 1, 2):
        assert (predicted[target == label] == label).mean() > 0.7, label


def _joined(*sets: ImageSet) -> ImageSet:
    masks = [s.masks for s in sets if s.masks is not None]
    return ImageSet(
        np.concatenate([s.images for s in sets]),
        np.concatenate([s.labels for s in sets]),
        tuple(p for s in sets for p in s.body_parts),
        tuple(d for s in sets for d in s.difficulties),
        np.concatenate(masks),
    )


def test_part_balance_draws_parts_by_their_loss_of_the_epoch_before() -> None:
    parts = ["hand"] * 40 + ["humerus"] * 60
    balance = _PartBalance(parts, share=0.5)
    generator = torch.Generator().manual_seed(0)
    drawn = np.concatenate([balance.draw(generator) for _ in range(50)])
    assert abs((drawn < 40).mean() - 0.4) < 0.02  # no losses yet: as many as there are
    balance.record(["hand"] * 4 + ["humerus"] * 6, torch.tensor([3.0] * 4 + [1.0] * 6))
    balance.update()
    # mean loss 1.8: weights 0.5 + 0.5 * 3 / 1.8 and 0.5 + 0.5 * 1 / 1.8
    assert balance.state_dict() == pytest.approx({"hand": 4 / 3, "humerus": 7 / 9})
    drawn = np.concatenate([balance.draw(generator) for _ in range(50)])
    expected = 40 * 4 / 3 / (40 * 4 / 3 + 60 * 7 / 9)  # 0.533
    assert abs((drawn < 40).mean() - expected) < 0.02
    chance = balance.probabilities()
    assert chance is not None and chance.sum() == pytest.approx(1.0)
    assert chance[0] / chance[-1] == pytest.approx((4 / 3) / (7 / 9))
    # an epoch without losses keeps the weights; state round-trips
    balance.update()
    again = _PartBalance(parts, share=0.5)
    again.load_state_dict(balance.state_dict())
    assert again.state_dict() == balance.state_dict()
    # off: share 0 or a single part
    assert not _PartBalance(parts, share=0.0).active
    assert _PartBalance(["hand"] * 10, share=0.5).probabilities() is None


def test_crops_keep_the_body_part_of_the_image_they_come_from() -> None:
    data = _joined(_line_set(20, seed=10, part="hand"), _line_set(20, seed=11, part="humerus"))
    cropper = _Cropper.create(data, CONFIG)
    assert cropper is not None
    cropper.hard = [(30, 48, 48)] * 10  # a mined false alarm on a humerus image
    cropper.hard_share = 1.0
    normal_hands = np.arange(1, 20, 2)  # every crop of theirs comes from the pool
    assert set(cropper.crops(normal_hands).body_parts) == {"humerus"}
    cropper.hard_share = 0.0
    assert set(cropper.crops(normal_hands).body_parts) == {"hand"}


def test_training_gives_the_part_with_faint_lines_more_of_its_draws(tmp_path: Path) -> None:
    train = _joined(
        _line_set(48, seed=12, part="hand", line=0.36),  # faint: hard to learn
        _line_set(48, seed=13, part="humerus"),  # plain
    )
    val = _line_set(16, seed=14)
    config = replace(CONFIG, part_balance=0.5, epochs=5)
    result = fit(config, train, val, tmp_path, CPU)
    last = result.history[-2]  # the weights the last epoch drew with
    assert last["weight_hand"] > 1.0 > last["weight_humerus"]
    lines = (tmp_path / EPOCH_LOG).read_text().splitlines()
    assert len(lines) == 5 and '"weight_hand"' in lines[0]
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["part_weights"]["hand"] == pytest.approx(result.history[-1]["weight_hand"], 1e-3)
    # without part_balance an epoch is a permutation, and nothing is logged
    plain = fit(replace(CONFIG, epochs=1), train, val, tmp_path / "plain", CPU)
    assert not any(k.startswith("weight_") for k in plain.history[0])
    # whole images (no crops) are drawn and weighed by part the same way
    whole = replace(CONFIG, crop_size=0, part_balance=0.5, epochs=2)
    result = fit(whole, train, val, tmp_path / "whole", CPU)
    assert {"weight_hand", "weight_humerus"} <= set(result.history[0])
