"""Every architecture builds, takes one grey channel, returns logits and names its CAM layer."""

from __future__ import annotations

import pytest
import torch

from boneflow.models.networks import (
    ARCHITECTURES,
    build_network,
    count_parameters,
    gradcam_layer,
)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_network_shapes_and_gradcam_layer(architecture: str) -> None:
    torch.manual_seed(0)
    network = build_network(architecture, 3).eval()
    with torch.inference_mode():
        logits = network(torch.rand(2, 1, 64, 64))
    assert logits.shape == (2, 3)
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
