"""Grad-CAM points at the fracture: a synthetic break's heat-map peak lies near the drawn line.

A small FractureNet is trained inside the test (easy-tier forearms at 192 px, image label
plus the generator's fracture line, under a minute on 2 CPU cores). On held-out
fractured images the Grad-CAM peak must fall within a few pixels of the generator's
ground-truth segment clearly more often than a random point on the body would.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import torch
from scipy.stats import binomtest

from boneflow.models.gradcam import FractureGradCAM
from boneflow.models.networks import gradcam_layer
from boneflow.models.transforms import Geometry, PreprocessParams, preprocess
from boneflow.training.demo import patient_rng
from boneflow.training.engine import FitConfig, build_image_set, fit

SIZE = 192
SOURCE = 384
NEAR = 14  # pixels on the 192 px input grid (~7 % of the image)
PART = "forearm"


Segment = tuple[float, float, float, float] | None


def _images(
    split: str, count: int
) -> tuple[list[npt.NDArray[np.float32]], list[int], list[Segment]]:
    from boneflow.training.synth import generate_image, to_display

    images: list[npt.NDArray[np.float32]] = []
    labels: list[int] = []
    segments: list[Segment] = []
    for i in range(count):
        broken = i % 2 == 0
        image = generate_image(
            patient_rng(11, split, i), PART, broken, SOURCE, difficulty="easy" if broken else None
        )
        images.append(to_display(image))
        labels.append(int(image.fractured))
        segments.append(image.fracture_segment)
    return images, labels, segments


def _near_line(
    segment: tuple[float, float, float, float], geometry: Geometry
) -> npt.NDArray[np.bool_]:
    x0, y0, x1, y1 = segment
    s, px, py = geometry.scale, geometry.pad_left, geometry.pad_top
    canvas = np.zeros((SIZE, SIZE), np.uint8)
    start = (round(x0 * s + px), round(y0 * s + py))
    end = (round(x1 * s + px), round(y1 * s + py))
    cv2.line(canvas, start, end, color=1, thickness=2 * NEAR + 1)
    return canvas.astype(bool)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    params = PreprocessParams(input_size=SIZE)
    images, labels, segments = _images("train", 640)
    train = build_image_set(images, labels, params, [PART] * len(labels), segments=segments)
    images, labels, segments = _images("val", 40)
    val = build_image_set(images, labels, params, [PART] * len(labels), segments=segments)
    config = FitConfig(
        architecture="fracnet",
        num_classes=2,
        epochs=12,
        batch_size=16,
        learning_rate=2e-3,
        optimizer="adamw",
        loss="weighted-ce",
        seed=3,
        schedule="cosine",
        early_stop_patience=100,
        localisation_weight=1.0,
        crop_size=96,  # crops around the line and mined false alarms, as the demo trains
    )
    torch.manual_seed(3)
    result = fit(config, train, val, Path(tmp_path_factory.mktemp("cam")), torch.device("cpu"))
    return result.network


def test_heatmap_peak_lies_near_the_fracture_more_often_than_chance(
    trained: torch.nn.Module,
) -> None:
    params = PreprocessParams(input_size=SIZE)
    images, labels, segments = _images("test", 480)
    cam = FractureGradCAM(trained, gradcam_layer("fracnet"))
    hits, chance = 0, []
    for image, label, segment in zip(images, labels, segments, strict=True):
        if not label or segment is None:
            continue
        tensor, geometry = preprocess(image, params)
        _, maps = cam(torch.from_numpy(tensor)[None])
        heat = maps[0].numpy()
        near = _near_line(segment, geometry)
        body = tensor[0] > 0.15  # the limb, not the padding or the air around it
        body |= near & (tensor[0] > 0)
        row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
        hits += bool(near[row, col])
        chance.append(float((near & body).sum()) / float(body.sum()))
    n = len(chance)
    baseline = float(np.mean(chance))
    assert n >= 200
    # a random point on the body lands near the line with probability `baseline`
    result = binomtest(hits, n, baseline, alternative="greater")
    assert hits / n >= 1.5 * baseline, (hits, n, baseline)
    assert result.pvalue < 0.01, (hits, n, baseline, result.pvalue)
