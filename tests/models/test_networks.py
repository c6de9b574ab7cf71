"""Every architecture builds, takes one grey channel, returns logits and names its CAM layer."""

from __future__ import annotations

import pytest
import torch

from boneflow.models.networks import (
    ARCHITECTURES,
    build_network,
    count_parameters,
    evidence_layer,
    gradcam_layer,
)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_network_shapes_and_gradcam_layer(architecture: str) -> None:
    torch.manual_seed(0)
    classes = 2 if architecture == "fracnet" else 3  # fracnet is a binary detector
    network = build_network(architecture, classes).eval()
    with torch.inference_mode():
        logits = network(torch.rand(2, 1, 64, 64))
    assert logits.shape == (2, classes)
    assert torch.isfinite(logits).all()
    layers = dict(network.named_modules())
    assert gradcam_layer(architecture) in layers
    assert count_parameters(network) > 10_000


def test_gradcam_layer_output_is_spatial() -> None:
    network = build_network("resnet10", 2).eval()
    seen: list[torch.Size] = []
    layer = dict(network.named_modules())[gradcam_layer("resnet10")]
    layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.inference_mode():
        network(torch.rand(1, 1, 96, 96))
    assert len(seen) == 1 and len(seen[0]) == 4 and seen[0][-1] > 1


def test_unknown_architecture_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="resnet18"):
        build_network("vgg16", 2)


def test_fracnet_logit_is_a_soft_maximum_of_its_evidence_map() -> None:
    torch.manual_seed(0)
    network = build_network("fracnet", 2).eval()
    name = evidence_layer("fracnet")
    assert name is not None and evidence_layer("resnet10") is None
    maps: list[torch.Tensor] = []
    dict(network.named_modules())[name].register_forward_hook(lambda _m, _i, o: maps.append(o))
    with torch.inference_mode():
        logits = network(torch.rand(2, 1, 96, 96))
    evidence = maps[0]
    assert evidence.shape == (2, 1, 12, 12)  # 1/8 of the input
    assert torch.all(logits[:, 0] == 0)
    peak = evidence.flatten(1).max(1).values
    mean = evidence.flatten(1).mean(1)
    assert torch.all(logits[:, 1] <= peak + 1e-5) and torch.all(logits[:, 1] >= mean - 1e-5)


def test_fracnet_refuses_more_than_two_classes() -> None:
    with pytest.raises(ValueError, match="binary"):
        build_network("fracnet", 8)
