"""Calibrating the synthetic fracture tiers: train a small network, report AUC per tier.

Run ``python -m boneflow.training.synth_calibrate --minutes 6`` (CPU is fine). Images are
drawn once with :func:`~boneflow.training.synth.generate_image`, shown to a MONAI
ResNet-10 at 128 px, and the held-out ROC-AUC is reported overall and for each difficulty
tier. This is a check of the generator, not boneflow's training pipeline.
"""

from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np
import numpy.typing as npt
import torch
from sklearn.metrics import roc_auc_score

from boneflow.findings import BODY_PARTS
from boneflow.models.networks import build_network
from boneflow.training.synth import generate_image, to_display

LIMBS = tuple(p for p in BODY_PARTS if p != "other")


def make_batch(
    seed: int, start: int, count: int, size: int, input_px: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], list[str]]:
    """``count`` limb images (half fractured) as network input, labels and tiers."""
    images, labels, tiers = [], [], []
    for i in range(start, start + count):
        rng = np.random.default_rng([seed, i])
        fractured = i % 2 == 0
        image = generate_image(rng, LIMBS[(i // 2) % len(LIMBS)], fractured, size)
        display = to_display(image)
        square = np.zeros((size, size), np.float32)
        square[:, : display.shape[1]] = display
        small = cv2.resize(square, (input_px, input_px), interpolation=cv2.INTER_AREA)
        images.append((small - 0.5) / 0.25)
        labels.append(int(fractured))
        tiers.append(image.difficulty)
    return np.stack(images)[:, None], np.asarray(labels, np.int64), tiers


def calibrate(
    minutes: float, size: int, input_px: int, n_train: int, n_val: int, seed: int
) -> dict[str, float]:
    """Train for ``minutes`` on ``n_train`` images; ROC-AUC on held-out images, per tier."""
    torch.manual_seed(seed)
    network = build_network("resnet10", 2)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=1e-4)
    x_train, y_train, _ = make_batch(seed, 0, n_train, size, input_px)
    x_val, y_val, tiers = make_batch(seed + 1, 0, n_val, size, input_px)
    deadline = time.monotonic() + minutes * 60
    seen, batch = 0, 32
    order_rng = np.random.default_rng(seed)
    while time.monotonic() < deadline:
        order = order_rng.permutation(n_train)
        for i in range(0, n_train - batch + 1, batch):
            idx = order[i : i + batch]
            x = torch.from_numpy(x_train[idx])
            if order_rng.random() < 0.5:  # left-right flip: fractures have no side
                x = torch.flip(x, dims=[3])
            network.train()
            loss = torch.nn.functional.cross_entropy(network(x), torch.from_numpy(y_train[idx]))
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            seen += batch
            if time.monotonic() > deadline:
                break
    network.eval()
    with torch.no_grad():
        scores = torch.cat(
            [
                torch.softmax(network(torch.from_numpy(x_val[i : i + 64])), 1)[:, 1]
                for i in range(0, n_val, 64)
            ]
        ).numpy()
    result = {"train_steps_images": float(seen), "auc_overall": float(roc_auc_score(y_val, scores))}
    negatives = y_val == 0
    for tier in ("easy", "moderate", "hard"):
        keep = negatives | np.asarray([t == tier for t in tiers])
        result[f"auc_{tier}"] = float(roc_auc_score(y_val[keep], scores[keep]))
    return result


def main() -> None:
    """Command-line entry: print the measured AUCs as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--size", type=int, default=256, help="generated image rows")
    parser.add_argument("--input", type=int, default=128, dest="input_px")
    parser.add_argument("--train", type=int, default=3000, dest="n_train")
    parser.add_argument("--val", type=int, default=600, dest="n_val")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = calibrate(args.minutes, args.size, args.input_px, args.n_train, args.n_val, args.seed)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
