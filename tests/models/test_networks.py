"""Every architecture builds, takes one grey channel, returns logits and names its CAM layer."""

from __future__ import annotations

import pytest
import torch

from boneflow.models.networks import (
    ARCHITECTURES,
    build_network,
    check_rotation,
    count_parameters,
    evidence_layer,
    gradcam_layer,
    rotate,
    scoring_batch,
    set_mirror,
    set_rotation,
    set_tiles,
    single_pass,
    supports_mirror,
    supports_tiles,
    tile_spans,
    tiled_pixels,
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


def test_resnet10_slim_is_resnet10_at_half_the_channels() -> None:
    full, slim = build_network("resnet10", 8), build_network("resnet10-slim", 8)
    assert [type(m) for m in slim.modules()] == [type(m) for m in full.modules()]
    widths = {
        name: (module.out_channels, dict(full.named_modules())[name].out_channels)
        for name, module in slim.named_modules()
        if isinstance(module, torch.nn.Conv2d)
    }
    assert widths and all(2 * mine == theirs for mine, theirs in widths.values())
    assert widths["layer4.0.conv2"] == (256, 512)
    # a quarter of the weights (each conv's in and out halved), the same head of 8 classes
    assert 0.2 < count_parameters(slim) / count_parameters(full) < 0.3


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
    maps = _recorded_evidence(network)
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


def test_training_ignores_mirror_rotated_and_tiled_scoring_and_scans_switch_them_off() -> None:
    torch.manual_seed(2)
    network = build_network("fracnet", 2)
    set_mirror(network, True)
    set_rotation(network, 6.0)
    set_tiles(network, 48, 8)
    seen: list[tuple[int, int]] = []
    network.stem.register_forward_hook(lambda _m, i, _o: seen.append(i[0].shape[:3:2]))
    network.train()
    network(torch.rand(2, 1, 64, 64)).sum().backward()
    network.eval()
    with torch.inference_mode():
        network(torch.rand(2, 1, 64, 64))
        with single_pass(network):
            network(torch.rand(2, 1, 64, 64))
        network(torch.rand(2, 1, 64, 64))
    # training: the 2 images whole; eval: 12 rows (3 views, mirrored) x 4 tiles of 48 px;
    # the scan: 2 again
    assert seen == [(2, 64), (48, 48), (2, 64), (48, 48)]
    assert network.mirror and (network.tile, network.tile_margin) == (48, 8)
    assert network.rotation == 6.0


def test_only_fracnet_scores_mirror_images() -> None:
    assert supports_mirror("fracnet")
    assert not supports_mirror("resnet10") and not supports_mirror("vgg16")
    with pytest.raises(ValueError, match="mirror"):
        set_mirror(build_network("resnet10", 2), True)
    set_mirror(build_network("resnet10", 2), False)  # off is always fine


def test_tile_spans_cover_the_axis_and_keep_the_margin() -> None:
    assert tile_spans(512, 320, 64) == [(0, 0, 256), (192, 256, 512)]
    assert tile_spans(512, 0, 0) == [(0, 0, 512)] == tile_spans(512, 512, 64)
    assert tile_spans(300, 512, 64) == [(0, 0, 300)]
    for length, tile, margin in [(512, 192, 64), (512, 256, 64), (1024, 320, 64), (520, 320, 96)]:
        spans = tile_spans(length, tile, margin)
        assert spans[0][1] == 0 and spans[-1][2] == length
        for (start, first, end), following in zip(spans, [*spans[1:], None], strict=True):
            assert start % 8 == first % 8 == end % 8 == 0
            assert 0 <= start <= first < end <= start + tile <= length
            if following is not None:
                assert following[1] == end  # contiguous, each pixel owned once
                assert end <= start + tile - margin + 8  # context kept (to a cell)
            if first > 0:
                assert first >= start + margin - 8
        # as few tiles as keep the margin
        owned = tile - 2 * margin
        assert len(spans) == -(-(length - 2 * margin) // owned)


def test_tiled_scoring_takes_each_cell_from_its_own_tile() -> None:
    torch.manual_seed(5)
    network = build_network("fracnet", 2).eval()
    maps = _recorded_evidence(network)
    x = torch.rand(2, 1, 128, 96)  # rows in two tiles of 96 px, columns in one
    assert tile_spans(128, 96, 16) == [(0, 0, 64), (32, 64, 128)]
    with torch.inference_mode():
        network(x[..., 0:96, :])
        network(x[..., 32:128, :])
        set_tiles(network, 96, 16)
        logits = network(x)
    upper, lower, tiled = maps
    assert tiled.shape == (2, 1, 16, 12)
    torch.testing.assert_close(tiled[:, :, :8], upper[:, :, :8])
    torch.testing.assert_close(tiled[:, :, 8:], lower[:, :, 4:])
    flat = tiled.flatten(1) * network.sharpness
    z = (torch.logsumexp(flat, 1) - torch.log(torch.tensor(192.0))) / network.sharpness
    torch.testing.assert_close(logits[:, 1], z, atol=1e-5, rtol=1e-5)


def test_tiled_scoring_limits_the_context_of_each_cell() -> None:
    torch.manual_seed(6)
    network = build_network("fracnet", 2).eval()
    maps = _recorded_evidence(network)
    x = torch.rand(1, 1, 256, 256)
    far = x.clone()
    far[..., 200:, 200:] = 1.0  # far from the top-left corner: outside its tile of 128 px
    with torch.inference_mode():
        network(x), network(far)
        set_tiles(network, 128, 32)
        network(x), network(far)
    whole, whole_far, tiled, tiled_far = maps
    corner = (slice(None), slice(None), slice(0, 8), slice(0, 8))  # its first 64 px
    assert not torch.allclose(whole[corner], whole_far[corner], atol=1e-6)  # sees it whole
    torch.testing.assert_close(tiled[corner], tiled_far[corner])  # not in its tile


def test_tiled_mirror_scoring_gives_an_image_and_its_mirror_image_one_score() -> None:
    torch.manual_seed(7)
    network = build_network("fracnet", 2).eval()
    set_mirror(network, True)
    set_tiles(network, 320, 64)
    x = torch.rand(2, 1, 512, 512)
    with torch.inference_mode():
        both, both_flipped = network(x), network(x.flip(-1))
        set_tiles(network, 0, 0)
        whole = network(x)
    torch.testing.assert_close(both, both_flipped, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both, whole, atol=1e-4)


def test_tiles_must_lie_on_the_cell_grid_and_only_fracnet_has_them() -> None:
    network = build_network("fracnet", 2)
    for tile, margin in [(100, 16), (320, 60), (64, 32), (-8, 0)]:
        with pytest.raises(ValueError):
            set_tiles(network, tile, margin)
    assert supports_tiles("fracnet") and not supports_tiles("resnet10")
    with pytest.raises(ValueError, match="tiled"):
        set_tiles(build_network("resnet10", 2), 320, 64)
    set_tiles(build_network("resnet10", 2), 0, 0)  # off is always fine


def test_a_scoring_pass_counts_the_pixels_of_mirror_images_and_tiles() -> None:
    cpu = torch.device("cpu")
    network = build_network("fracnet", 2)
    assert tiled_pixels(512, 512, 320, 64) == 4 * 320 * 320
    assert tiled_pixels(512, 512, 0, 0) == 512 * 512 == tiled_pixels(512, 512, 640, 64)
    assert scoring_batch(network, 32, 512, 512, cpu) == 8
    set_mirror(network, True)
    assert scoring_batch(network, 32, 512, 512, cpu) == 4
    set_tiles(network, 320, 64)
    assert scoring_batch(network, 32, 512, 512, cpu) == 2  # 2**21 // (2 * 409600)
    assert scoring_batch(network, 32, 512, 512, torch.device("meta")) == 32  # not a CPU


def test_rotate_turns_about_the_centre_in_pixels_whatever_the_aspect() -> None:
    x = torch.zeros(1, 1, 64, 96)
    x[..., 31:33, 71:73] = 1.0  # 24 px right of the centre (31.5, 47.5)
    for degrees, (row, col) in ((90.0, (7.5, 47.5)), (-90.0, (55.5, 47.5))):
        turned = rotate(x, degrees)[0, 0]
        rows, cols = torch.nonzero(turned > 0.25, as_tuple=True)
        assert float(rows.float().mean()) == pytest.approx(row, abs=0.6), degrees
        assert float(cols.float().mean()) == pytest.approx(col, abs=0.6), degrees
    grid = torch.arange(96.0)
    smooth = (torch.sin(grid / 6)[:, None] * torch.cos(grid / 7)[None, :]).expand(2, 1, 96, 96)
    back = rotate(rotate(smooth, 12.0), -12.0)  # there and back: the middle is unchanged
    torch.testing.assert_close(
        back[..., 24:72, 24:72], smooth[..., 24:72, 24:72], atol=0.02, rtol=0
    )
    assert rotate(smooth, 0.0) is smooth


def test_rotated_views_average_the_log_odds_of_the_image_turned_both_ways() -> None:
    torch.manual_seed(8)
    network = build_network("fracnet", 2).eval()
    twin = build_network("fracnet", 2).eval()
    twin.load_state_dict(network.state_dict())
    x = torch.rand(2, 1, 96, 96)
    for mirror in (False, True):
        set_mirror(network, mirror)
        set_mirror(twin, mirror)
        set_rotation(network, 8.0)
        with torch.inference_mode():
            logits = network(x)
            views = [twin(v)[:, 1] for v in (x, rotate(x, 8.0), rotate(x, -8.0))]
        torch.testing.assert_close(logits[:, 1], torch.stack(views).mean(0), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logits[:, 1], views[0], atol=1e-4)
    # the mirrored image's views are the image's views mirrored (+/- swapped): one score
    with torch.inference_mode():
        torch.testing.assert_close(network(x.flip(-1)), logits, atol=1e-5, rtol=1e-5)


def test_scoring_passes_count_the_rotated_views() -> None:
    network = build_network("fracnet", 2)
    set_rotation(network, 6.0)
    cpu = torch.device("cpu")
    plain = build_network("fracnet", 2)
    # 2**21 pixels a pass: 8 images of 512 px scored once, 2 scored as three views
    passes = [scoring_batch(net, 64, 512, 512, cpu) for net in (plain, network)]
    assert passes == [8, 2]


def test_rotated_views_are_small_turns_of_fracnet_only() -> None:
    for bad in (-1.0, 46.0, float("nan")):
        with pytest.raises(ValueError, match="rotation"):
            check_rotation(bad)
    check_rotation(0.0)
    check_rotation(45.0)
    with pytest.raises(ValueError, match="rotated views"):
        set_rotation(build_network("resnet10", 2), 6.0)
    set_rotation(build_network("resnet10", 2), 0.0)  # off is always fine


def _recorded_evidence(network: torch.nn.Module) -> list[torch.Tensor]:
    """The evidence maps of every later pass of ``network``, in order."""
    maps: list[torch.Tensor] = []
    dict(network.named_modules())["evidence"].register_forward_hook(
        lambda _m, _i, o: maps.append(o)
    )
    return maps
