"""Inference benchmarks: preprocessing, model throughput, Grad-CAM overhead, end to end.

Run: ``.venv/bin/python bench/inference.py [--quick] [--device cpu|cuda] [--json FILE]``.

- decode + ``read_pixels`` per transfer syntax (RG3, 1760²);
- ``preprocess`` (display pixels → (1, S, S) tensor) against two plain numpy + OpenCV
  chains doing the same work: the issue's reference order (invert → percentiles → CLAHE →
  resize + pad, all at full size) and boneflow's order (resize → percentiles → CLAHE → pad);
- model images/s at batch 1 and 16 (inference mode) per architecture;
- Grad-CAM: boneflow's one-pass head-only Grad-CAM and MONAI's stock GradCAM (full backward)
  against a plain forward;
- ``Analyzer.analyse`` end to end (router + fracture + Grad-CAM + mapping back) on RG3:
  p50 per image one at a time, and images/s for a 16-image study.

Models have random (seeded) weights: speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import torch
from monai.visualize import GradCAM
from pydicom.data import get_testdata_file

from boneflow.dicom.pixels import read_pixels
from boneflow.findings import BODY_PARTS
from boneflow.models import networks
from boneflow.models.gradcam import FractureGradCAM
from boneflow.models.inference import Analyzer, ImageInput
from boneflow.models.networks import build_network, gradcam_layer
from boneflow.models.registry import FRACTURE_LABELS, ModelManifest, Registry
from boneflow.models.transforms import PreprocessParams, preprocess


def timed(fn: Callable[[], object], repeat: int, warmup: int = 2) -> list[float]:
    """Milliseconds of each of ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def bench_decode(repeat: int) -> dict[str, float]:
    results = {}
    for name in ("RG3_UNCR", "RG3_J2KR", "RG3_J2KI"):
        path = get_testdata_file(f"{name}.dcm")
        results[name] = p50(timed(lambda p=path: read_pixels(pydicom.dcmread(p)), repeat, 1))
    return results


def plain_reference_chain(stored: np.ndarray, size: int) -> np.ndarray:
    """The issue's plain chain: invert → percentiles → CLAHE → resize + pad, at full size."""
    image = stored.max() - stored.astype(np.float32)  # MONOCHROME1
    low, high = np.percentile(image, (0.5, 99.5))
    image = np.clip((image - low) / (high - low), 0, 1)
    enhanced = cv2.createCLAHE(2.0, (8, 8)).apply((image * 255 + 0.5).astype(np.uint8))
    rows, cols = enhanced.shape
    scale = size / max(rows, cols)
    resized = cv2.resize(enhanced, (round(cols * scale), round(rows * scale)), cv2.INTER_AREA)
    out = np.zeros((size, size), np.float32)
    out[: resized.shape[0], : resized.shape[1]] = resized / 255.0
    return out[None]


def plain_same_order_chain(display: np.ndarray, size: int) -> np.ndarray:
    """The same operations as ``preprocess``, inline: resize → percentiles → CLAHE → pad."""
    rows, cols = display.shape
    scale = size / max(rows, cols)
    new_rows, new_cols = round(rows * scale), round(cols * scale)
    resized = cv2.resize(display, (new_cols, new_rows), interpolation=cv2.INTER_AREA)
    low, high = np.percentile(resized, (0.5, 99.5))
    image = np.clip((resized - low) / (high - low), 0, 1)
    enhanced = cv2.createCLAHE(2.0, (8, 8)).apply((image * 255 + 0.5).astype(np.uint8))
    out = np.zeros((size, size), np.float32)
    top, left = (size - new_rows) // 2, (size - new_cols) // 2
    out[top : top + new_rows, left : left + new_cols] = enhanced / 255.0
    return out[None]


def bench_preprocess(repeat: int) -> dict[str, Any]:
    """``preprocess`` against the two plain chains, interleaved (same load for each)."""
    ds = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"))
    stored = ds.pixel_array
    display = read_pixels(ds)
    params = PreprocessParams()
    timings = _interleaved(
        {
            "preprocess": lambda: preprocess(display, params),
            "plain_same_order": lambda: plain_same_order_chain(display, 224),
            "plain_reference_order": lambda: plain_reference_chain(stored, 224),
            "read_pixels": lambda: read_pixels(ds),
        },
        repeat,
    )
    out: dict[str, Any] = {}
    for name, samples in timings.items():
        out[f"{name}_ms"] = p50(samples)
        out[f"{name}_min_ms"] = round(min(samples), 2)
    for name in ("plain_same_order", "plain_reference_order"):
        ratios = [a / b for a, b in zip(timings["preprocess"], timings[name], strict=True)]
        out[f"ratio_vs_{name}"] = round(statistics.median(ratios), 2)
    return out


def bench_models(
    device: torch.device, architectures: list[tuple[str, int]], quick: bool
) -> list[dict[str, Any]]:
    """Forward, one-pass Grad-CAM and MONAI's stock GradCAM, timed in interleaved rounds.

    Interleaving puts the three under the same load at each moment, so their ratios hold
    even on a busy machine; ``*_min_ms`` is the best round (the least disturbed).
    """
    rows = []
    for arch, size in architectures:
        torch.manual_seed(0)
        net = _prepared(build_network(arch, 2), device)
        cam = FractureGradCAM(net, gradcam_layer(arch))
        stock_net = _prepared(build_network(arch, 2), device)
        stock = GradCAM(nn_module=stock_net, target_layers=gradcam_layer(arch))
        row: dict[str, Any] = {"architecture": arch, "input_size": size}
        for batch in (1, 16):
            x = torch.rand(batch, 1, size, size, device=device)
            if device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            rounds = (3 if quick else 12) if batch == 1 else (2 if quick else 5)

            def forward(x: torch.Tensor = x, net: torch.nn.Module = net) -> None:
                with torch.inference_mode(), _autocast(device):
                    net(x)
                _sync(device)

            def one_pass(x: torch.Tensor = x, cam: FractureGradCAM = cam) -> None:
                with _autocast(device):
                    cam(x)
                _sync(device)

            def monai_stock(x: torch.Tensor = x, stock: GradCAM = stock) -> None:
                stock(x, class_idx=1)
                _sync(device)

            timings = _interleaved(
                {"forward": forward, "gradcam": one_pass, "monai_stock_gradcam": monai_stock},
                rounds,
            )
            for name, samples in timings.items():
                row[f"batch{batch}_{name}_ms"] = p50(samples)
                row[f"batch{batch}_{name}_min_ms"] = round(min(samples), 2)
            forward_ms = timings["forward"]
            row[f"batch{batch}_images_per_s"] = round(batch * 1000 / p50(forward_ms), 1)
            row[f"batch{batch}_images_per_s_best"] = round(batch * 1000 / min(forward_ms), 1)
            for name in ("gradcam", "monai_stock_gradcam"):
                ratios = [c / f for c, f in zip(timings[name], forward_ms, strict=True)]
                row[f"batch{batch}_{name}_vs_forward"] = round(statistics.median(ratios), 2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def _prepared(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    net = net.eval().to(device)
    if device.type == "cpu":
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return net


def _interleaved(
    functions: dict[str, Callable[[], object]], rounds: int, warmup: int = 3
) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            t0 = time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - t0) * 1000)
    return out


def bench_end_to_end(device: str, config: dict[str, Any], quick: bool) -> dict[str, Any]:
    """``config``: router and fracture networks and sizes; ``mirror`` (the fracture model
    scores mirror images too); ``rotation`` (and views turned by +/- that many degrees);
    ``tile``, ``tile_margin`` (it scores in tiles); ``pass_pixels``
    (the CPU pass cap, ``networks.CPU_PASS_PIXELS``; a huge value turns it off, for
    comparison)."""
    cap = networks.CPU_PASS_PIXELS
    networks.CPU_PASS_PIXELS = int(config.get("pass_pixels", cap))
    try:
        return _end_to_end(device, config, quick)
    finally:
        networks.CPU_PASS_PIXELS = cap


def _end_to_end(device: str, config: dict[str, Any], quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        registry = Registry(Path(folder))
        torch.manual_seed(0)
        registry.register(
            build_network(config["router"], len(BODY_PARTS)),
            ModelManifest(
                name="router",
                version="1",
                task="router",
                architecture=config["router"],
                labels=BODY_PARTS,
                body_parts=BODY_PARTS,
                input_size=config["router_size"],
                preprocessing=PreprocessParams(input_size=config["router_size"]).to_dict(),
                threshold=0.0,
            ),
        )
        registry.register(
            build_network(config["fracture"], 2),
            ModelManifest(
                name="fracture",
                version="1",
                task="fracture",
                architecture=config["fracture"],
                labels=FRACTURE_LABELS,
                body_parts=tuple(p for p in BODY_PARTS if p != "other"),
                input_size=config["fracture_size"],
                preprocessing=PreprocessParams(input_size=config["fracture_size"]).to_dict(),
                threshold=0.5,
                mirror=bool(config.get("mirror", False)),
                tile=int(config.get("tile", 0)),
                tile_margin=int(config.get("tile_margin", 0)),
                rotation=float(config.get("rotation", 0.0)),
            ),
        )
        analyzer = Analyzer(registry, device=device, batch_size=16)
        ds = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"))
        image = ImageInput(str(ds.SOPInstanceUID), read_pixels(ds), "LEG", "R")
        single = timed(lambda: analyzer.analyse([image]), 5 if quick else 20, 2)
        study = [image] * 16
        study_samples = timed(lambda: analyzer.analyse(study), 1 if quick else 3, 1)
        batch_ms = p50(study_samples)
        (finding,) = analyzer.analyse([image])
        assert finding.body_part == "lower_leg" and finding.heatmap is not None
        return {
            **config,
            "p50_ms_per_image_one_at_a_time": p50(single),
            "p90_ms_per_image_one_at_a_time": round(float(np.percentile(single, 90)), 2),
            "min_ms_per_image_one_at_a_time": round(min(single), 2),
            "study_of_16_ms": batch_ms,
            "images_per_s_batched": round(16 * 1000 / batch_ms, 1),
            "images_per_s_batched_best": round(16 * 1000 / min(study_samples), 1),
            "stage_ms_one_image": dict(finding.timings_ms),
        }


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, fewer networks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    )
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    architectures = [
        ("resnet10", 128),
        ("fracnet", 512),
        ("fracnet", 384),
        ("resnet18", 192),
        ("resnet18", 224),
        ("efficientnet-b0", 224),
    ]
    if not args.quick:
        architectures.append(("densenet121", 224))
    results: dict[str, Any] = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "decode_ms": bench_decode(3 if args.quick else 10),
        "preprocess": bench_preprocess(10 if args.quick else 50),
    }
    print(json.dumps(results, indent=2), file=sys.stderr)
    results["models"] = bench_models(device, architectures, args.quick)
    results["end_to_end"] = [
        bench_end_to_end(str(device), c, args.quick)
        for c in (
            {  # the demo's models (round 16: mirror scoring of three views of each image)
                "router": "resnet10-slim",
                "router_size": 128,
                "fracture": "fracnet",
                "fracture_size": 512,
                "mirror": True,
                "rotation": 6.0,
            },
            {  # mirror scoring in 320 px tiles (an option since round 13)
                "router": "resnet10",
                "router_size": 128,
                "fracture": "fracnet",
                "fracture_size": 512,
                "mirror": True,
                "tile": 320,
                "tile_margin": 64,
            },
            {  # the demo's models of rounds 12-15: mirror scoring of whole images
                "router": "resnet10",
                "router_size": 128,
                "fracture": "fracnet",
                "fracture_size": 512,
                "mirror": True,
            },
            {  # the same without the CPU pass cap (all 16 images of a study in one pass)
                "router": "resnet10",
                "router_size": 128,
                "fracture": "fracnet",
                "fracture_size": 512,
                "mirror": True,
                "pass_pixels": 2**40,
            },
            {  # the demo's models before round 12: single images
                "router": "resnet10",
                "router_size": 128,
                "fracture": "fracnet",
                "fracture_size": 512,
            },
            {  # the demo's models before 2026-12-07
                "router": "resnet10",
                "router_size": 128,
                "fracture": "fracnet",
                "fracture_size": 384,
            },
            {
                "router": "resnet10",
                "router_size": 128,
                "fracture": "resnet18",
                "fracture_size": 192,
            },
            {
                "router": "resnet18",
                "router_size": 224,
                "fracture": "resnet18",
                "fracture_size": 224,
            },
        )
    ]
    results["load_average_at_end"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
