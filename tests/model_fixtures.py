"""Small, real, seeded models for tests of the plumbing (worker, listener, Orthanc round trip).

``make_test_models(model_dir)`` registers:

- ``test-router@1``: resnet10 router over :data:`boneflow.findings.BODY_PARTS`, threshold 0.0
  (it always routes). Its output layer is scaled down so that its probabilities are nearly
  uniform with a slight lean to ``lower_leg``: an image whose header names a part (e.g.
  BodyPartExamined ``HAND``, or ``CHEST`` → ``other``) goes to that part through the header
  prior, and an image without a usable hint goes to ``lower_leg``. So RG1 (CHEST) is not
  analysed and RG3 (EXTREMITY) is analysed as a lower leg, deterministically.
- ``test-fracture-arm@1`` (hand, wrist, forearm, elbow, humerus, shoulder) and
  ``test-fracture-leg@1`` (lower_leg): resnet10 fracture models, random but seeded weights
  with a head that reads the features out positively (so Grad-CAM maps are not empty),
  threshold 0.5.

Usage: ``from tests.model_fixtures import make_test_models``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from boneflow.findings import BODY_PARTS
from boneflow.models.networks import build_network
from boneflow.models.registry import FRACTURE_LABELS, ModelManifest, Registry
from boneflow.models.transforms import PreprocessParams

ROUTER = "test-router"
ARM = ("hand", "wrist", "forearm", "elbow", "humerus", "shoulder")
FRACTURE_MODELS = {"test-fracture-arm": ARM, "test-fracture-leg": ("lower_leg",)}
_CREATED_AT = "2026-01-01T00:00:00+00:00"


def make_test_models(model_dir: Path, seed: int = 0, input_size: int = 224) -> None:
    """Register the test router and fracture models under ``model_dir`` (idempotent)."""
    registry = Registry(model_dir)
    existing = {m.model_id for m in registry.list()}
    params = PreprocessParams(input_size=input_size).to_dict()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        router = build_network("resnet10", len(BODY_PARTS))
        _lean_towards(router, BODY_PARTS.index("lower_leg"))
        fracture = {name: build_network("resnet10", 2) for name in FRACTURE_MODELS}
        for network in fracture.values():
            _explainable(network)
    if f"{ROUTER}@1" not in existing:
        registry.register(
            router,
            ModelManifest(
                name=ROUTER,
                version="1",
                task="router",
                architecture="resnet10",
                labels=BODY_PARTS,
                body_parts=BODY_PARTS,
                input_size=input_size,
                preprocessing=params,
                threshold=0.0,
                metrics={"note": "random test weights"},
                data_fingerprint=f"test-seed-{seed}",
                created_at=_CREATED_AT,
            ),
        )
    for name, parts in FRACTURE_MODELS.items():
        if f"{name}@1" in existing:
            continue
        registry.register(
            fracture[name],
            ModelManifest(
                name=name,
                version="1",
                task="fracture",
                architecture="resnet10",
                labels=FRACTURE_LABELS,
                body_parts=parts,
                input_size=input_size,
                preprocessing=params,
                threshold=0.5,
                metrics={"note": "random test weights"},
                data_fingerprint=f"test-seed-{seed}",
                created_at=_CREATED_AT,
            ),
        )


def _explainable(network: torch.nn.Module) -> None:
    """Give the head a positive read-out so that Grad-CAM maps are not all zero.

    With random heads the log-odds gradient is often negative everywhere and Grad-CAM's ReLU
    leaves nothing; here P(fracture) rises (gently, staying near 0.5) with the layer-4
    activations, so the map shows where the network's features respond.
    """
    head = network.fc
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        magnitude = head.weight.abs().mean(dim=0)
        head.weight[0] = -0.1 * magnitude
        head.weight[1] = 0.1 * magnitude
        head.bias.zero_()


def _lean_towards(network: torch.nn.Module, index: int) -> None:
    """Make the logits nearly flat, with a small lead for class ``index``."""
    head = network.fc  # MONAI ResNet's classifier
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.weight.mul_(1e-3)
        head.bias.zero_()
        head.bias[index] = 0.5
