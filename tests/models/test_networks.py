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
    mirror_off,
    set_mirror,
    supports_mirror,
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


def test_mirror_scoring_gives_an_image_and_its_mirror_image_one_score() -> None:
    torch.manual_seed(0)
    network = build_network("fracnet", 2).eval()
    x = torch.rand(3, 1, 96, 96)
    with torch.inference_mode():
        plain, plain_flipped = network(x), network(x.flip(-1))
        set_mirror(network, True)
        both, both_flipped = network(x), network(x.flip(-1))
    assert not torch.allclose(plain, plain_flipped, atol=1e-4)  # the network alone is not
    torch.testing.assert_close(both, both_flipped, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both, plain, atol=1e-4)


def test_mirror_scoring_averages_the_two_evidence_maps_before_pooling() -> None:
    torch.manual_seed(1)
    network = build_network("fracnet", 2).eval()
    maps: list[torch.Tensor] = []
    dict(network.named_modules())["evidence"].register_forward_hook(
        lambda _m, _i, o: maps.append(o)
    )
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        network(x)
        network(x.flip(-1))
        set_mirror(network, True)
        logits = network(x)
    own, mirrored, both = maps
    assert both.shape == (4, 1, 8, 8)  # one pass over the images and their mirror images
    torch.testing.assert_close(both[:2], own)
    average = (own + mirrored.flip(-1)) / 2
    flat = average.flatten(1) * network.sharpness
    z = (torch.logsumexp(flat, 1) - torch.log(torch.tensor(64.0))) / network.sharpness
    torch.testing.assert_close(logits[:, 1], z, atol=1e-5, rtol=1e-5)


def test_training_ignores_mirror_scoring_and_scans_can_switch_it_off() -> None:
    torch.manual_seed(2)
    network = build_network("fracnet", 2)
    set_mirror(network, True)
    seen: list[int] = []
    network.stem.register_forward_hook(lambda _m, i, _o: seen.append(i[0].shape[0]))
    network.train()
    network(torch.rand(2, 1, 64, 64)).sum().backward()
    network.eval()
    with torch.inference_mode():
        network(torch.rand(2, 1, 64, 64))
        with mirror_off(network):
            network(torch.rand(2, 1, 64, 64))
        network(torch.rand(2, 1, 64, 64))
    assert seen == [2, 4, 2, 4]


def test_only_fracnet_scores_mirror_images() -> None:
    assert supports_mirror("fracnet")
    assert not supports_mirror("resnet10") and not supports_mirror("vgg16")
    with pytest.raises(ValueError, match="mirror"):
        set_mirror(build_network("resnet10", 2), True)
    set_mirror(build_network("resnet10", 2), False)  # off is always fine
