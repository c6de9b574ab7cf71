"""Grad-CAM: the one-pass map equals MONAI's own GradCAM, and the hotspot box."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.visualize.class_activation_maps import GradCAM, ModelWithHooks

from boneflow.findings import BoundingBox
from boneflow.models.gradcam import FractureGradCAM, hotspot
from boneflow.models.networks import (
    build_network,
    gradcam_layer,
    rotate,
    set_mirror,
    set_rotation,
    set_tiles,
)


class _LogOddsHooks(ModelWithHooks):  # type: ignore[misc]
    """Stock MONAI hooks (full backward pass) explaining the fracture log-odds."""

    def class_score(self, logits: torch.Tensor, class_idx: int) -> torch.Tensor:
        return logits[:, 1] - logits[:, 0]


@pytest.mark.parametrize("architecture", ["resnet10", "resnet18"])
def test_one_pass_gradcam_equals_monai_stock_gradcam(architecture: str) -> None:
    torch.manual_seed(7)
    network = build_network(architecture, 2).eval()
    reference = build_network(architecture, 2).eval()
    reference.load_state_dict(network.state_dict())
    layer = gradcam_layer(architecture)
    stock = GradCAM(
        nn_module=_LogOddsHooks(reference, layer, register_forward=True, register_backward=True),
        target_layers=layer,
    )
    x = torch.rand(3, 1, 96, 96)
    raw = stock.compute_map(x, class_idx=1)[:, 0].detach()  # before MONAI's (inverting) normaliser
    expected = torch.nn.functional.interpolate(raw[:, None], size=(96, 96), mode="bilinear")[:, 0]

    logits, maps = FractureGradCAM(network, layer)(x)

    with torch.inference_mode():
        assert torch.allclose(logits, reference(x), atol=1e-5)
    assert maps.shape == (3, 96, 96)
    for got, want in zip(maps, expected, strict=True):
        if float(want.max()) > 1e-8:
            torch.testing.assert_close(got, want / want.max(), atol=1e-4, rtol=1e-3)
        else:
            assert float(got.max()) == 0.0
    assert any(float(m.max()) > 1e-6 for m in expected)  # the comparison was not all-zero


def test_mirror_scoring_maps_follow_the_image_when_it_is_mirrored() -> None:
    torch.manual_seed(3)
    network = build_network("fracnet", 2).eval()
    twin = build_network("fracnet", 2).eval()
    twin.load_state_dict(network.state_dict())
    set_mirror(network, True)
    cam = FractureGradCAM(network, gradcam_layer("fracnet"))
    x = torch.rand(2, 1, 96, 96)
    logits, maps = cam(x)
    logits_flipped, maps_flipped = cam(x.flip(-1))
    assert maps.shape == (2, 96, 96) and float(maps.max()) == pytest.approx(1.0)
    torch.testing.assert_close(logits, logits_flipped, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps_flipped, maps.flip(-1), atol=1e-4, rtol=1e-3)
    with torch.inference_mode():
        torch.testing.assert_close(logits, network(x), atol=1e-5, rtol=1e-5)
    # the single-image map differs: the heat shows the averaged evidence, not one side's
    _, single = FractureGradCAM(twin, gradcam_layer("fracnet"))(x)
    assert not torch.allclose(single, maps, atol=1e-3)


def test_tiled_scoring_maps_cover_the_image_and_follow_it_when_mirrored() -> None:
    torch.manual_seed(4)
    network = build_network("fracnet", 2).eval()
    set_mirror(network, True)
    set_tiles(network, 96, 16)  # 128 px: two tiles a side
    cam = FractureGradCAM(network, gradcam_layer("fracnet"))
    x = torch.rand(2, 1, 128, 128)
    maps = _maps_following_the_mirror(cam, network, x, atol=1e-4)
    set_tiles(network, 0, 0)
    _, whole = cam(x)  # the whole image's map differs: the tiles limit each cell's context
    assert not torch.allclose(whole, maps, atol=1e-3)


class _TurnedViews(torch.nn.Module):
    """Scores three turned views by the mean brightness of its ``cells`` (the image itself),
    so each view's Grad-CAM map is that view."""

    rotation = 20.0

    def __init__(self) -> None:
        super().__init__()
        self.cells = torch.nn.Identity()
        self.gain = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = torch.cat([x, rotate(x, self.rotation), rotate(x, -self.rotation)])
        z = (self.cells(views) * self.gain).mean((1, 2, 3)).view(3, -1).mean(0)
        return torch.stack([torch.zeros_like(z), z], dim=1)


def test_rotated_views_maps_are_turned_back_onto_the_image() -> None:
    x = torch.zeros(1, 1, 64, 64)
    x[..., 16:21, 42:47] = 1.0  # a bright spot off the centre
    _, maps = FractureGradCAM(_TurnedViews(), "cells")(x)
    assert maps.shape == (1, 64, 64)
    heat = maps[0]
    near = heat[12:25, 38:51].sum() / heat.sum()
    # turned back, the three views' spots coincide (unturned they would lie 7 px apart)
    assert float(near) > 0.9
    peak = divmod(int(heat.argmax()), 64)
    assert abs(peak[0] - 18) <= 2 and abs(peak[1] - 44) <= 2


def test_rotated_and_mirrored_views_maps_follow_the_image_when_it_is_mirrored() -> None:
    torch.manual_seed(5)
    network = build_network("fracnet", 2).eval()
    set_mirror(network, True)
    set_rotation(network, 8.0)
    cam = FractureGradCAM(network, gradcam_layer("fracnet"))
    x = torch.rand(2, 1, 96, 96)
    maps = _maps_following_the_mirror(cam, network, x, atol=1e-3)
    set_rotation(network, 0.0)
    _, unturned = cam(x)
    assert not torch.allclose(unturned, maps, atol=1e-3)


def _maps_following_the_mirror(
    cam: FractureGradCAM, network: torch.nn.Module, x: torch.Tensor, atol: float
) -> torch.Tensor:
    """The maps of ``x``, once its mirror image has been shown the same score and the
    mirrored heat (a network with mirror scoring); the logits are the network's own."""
    logits, maps = cam(x)
    logits_flipped, maps_flipped = cam(x.flip(-1))
    assert maps.shape == (x.shape[0], *x.shape[-2:]) and float(maps.max()) == pytest.approx(1.0)
    with torch.inference_mode():
        torch.testing.assert_close(logits, network(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, logits_flipped, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps_flipped, maps.flip(-1), atol=atol, rtol=1e-3)
    return maps


def test_a_map_without_evidence_is_zero() -> None:
    torch.manual_seed(7)  # at this seed efficientnet-b0's raw maps are ~1e-14
    network = build_network("efficientnet-b0", 2).eval()
    _, maps = FractureGradCAM(network, gradcam_layer("efficientnet-b0"))(torch.rand(3, 1, 96, 96))
    assert float(maps.max()) == 0.0
    assert hotspot(maps[0].numpy()) is None


def test_gradcam_leaves_no_gradients_and_plain_inference_still_works() -> None:
    network = build_network("resnet10", 2).eval()
    cam = FractureGradCAM(network, gradcam_layer("resnet10"))
    cam(torch.rand(1, 1, 64, 64))
    assert all(p.grad is None and not p.requires_grad for p in network.parameters())
    with torch.inference_mode():
        assert network(torch.rand(2, 1, 64, 64)).shape == (2, 2)


def test_gradcam_runs_inside_inference_mode() -> None:
    network = build_network("resnet10", 2).eval()
    cam = FractureGradCAM(network, gradcam_layer("resnet10"))
    with torch.inference_mode():
        logits, maps = cam(torch.rand(2, 1, 64, 64))
    assert logits.shape == (2, 2)
    assert maps.shape == (2, 64, 64)


def test_hotspot_is_the_region_around_the_peak() -> None:
    heat = np.zeros((100, 80), dtype=np.float32)
    heat[10:20, 5:15] = 0.6  # a lesser blob
    heat[50:70, 30:45] = 0.8
    heat[60, 40] = 1.0
    assert hotspot(heat) == BoundingBox(row_min=50, col_min=30, row_max=70, col_max=45)
    assert hotspot(np.zeros((5, 5), dtype=np.float32)) is None
