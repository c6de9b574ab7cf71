"""The networks boneflow trains (MONAI implementations) and each one's Grad-CAM layer.

Every network takes one grey channel and returns logits. The Grad-CAM target layer of each
architecture is named here and only here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from monai.networks import nets
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True, slots=True)
class Architecture:
    """How to build one network and where Grad-CAM looks."""

    build: Callable[[int], nn.Module]
    gradcam_layer: str
    evidence_layer: str | None = None  # a 1-channel evidence map a training mask can supervise
    # an evidence-map detector: can score an image together with its mirror image, and in
    # tiles of limited context (FractureNet)
    scoring_options: bool = False


def _densenet121(num_classes: int) -> nn.Module:
    module: nn.Module = nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=num_classes)
    return module


def _densenet169(num_classes: int) -> nn.Module:
    module: nn.Module = nets.DenseNet169(spatial_dims=2, in_channels=1, out_channels=num_classes)
    return module


def _resnet(depth: int, widen: float = 1.0) -> Callable[[int], nn.Module]:
    factory = {10: nets.resnet10, 18: nets.resnet18, 34: nets.resnet34, 50: nets.resnet50}[depth]

    def build(num_classes: int) -> nn.Module:
        # MONAI keeps a stride-1 stem by default; stride 2 is the usual ImageNet stem and
        # 2.5x faster at 224 px with no loss on radiographs of this size.
        module: nn.Module = factory(
            spatial_dims=2,
            n_input_channels=1,
            num_classes=num_classes,
            conv1_t_stride=2,
            widen_factor=widen,
        )
        return module

    return build


class _Residual(nn.Module):
    """Two 3x3 convolutions (optionally dilated) with an identity shortcut."""

    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.act(x + self.body(x))
        return out


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class FractureNet(nn.Module):
    """A small fully-convolutional detector of local defects (multiple-instance pooling).

    Three stride-2 stages bring the image to 1/8 resolution (24x24 cells at 192 px, each
    seeing thin lines at full detail); dilated residual blocks widen the context so that a
    line crossing the whole bone can be told from a canal or growth plate. A 1x1 convolution
    gives a per-cell fracture evidence map (``evidence``, trainable against a drawn fracture
    line), and log-sum-exp pooling (a soft maximum) turns it into the image's logit: one
    broken spot is enough. Returns logits (B, 2) = ``[0, z]``, so softmax gives
    ``sigmoid(z)``. ``cells`` (the features of each cell) is the Grad-CAM layer.

    ``mirror`` (mirror scoring, off by default; the registry sets it from the manifest): in
    eval mode the network scores the image and its left-right mirror image in one batch
    of 2B and averages the two evidence maps (the mirror's flipped back) before pooling,
    so that a spot must look broken both ways round. Training ignores it (its augmentation
    flips). Layers that see the batch (hooks on ``cells`` or ``evidence``) then see
    2B rows: the image's B first, then their mirror images.

    ``rotation`` (rotated views, degrees, off by default; the registry sets it from the
    manifest): in eval mode the network also scores the image turned by +``rotation`` and
    -``rotation`` degrees about its centre (as training's augmentation turns it) and
    averages the three logits: one view's chance peak on a structure that looks broken
    from one angle is outvoted by the other two. Layers that see the batch then see 3B
    rows (the B images, then turned one way, then the other; each run mirrored as above
    when ``mirror`` is on). Training ignores it.

    ``tile`` and ``tile_margin`` (tiled scoring, off by default; the registry sets them
    from the manifest): in eval mode an image larger than ``tile`` px is scored in
    overlapping tiles of that size (:func:`tile_spans`) and each cell of the evidence map
    is taken from the tile in which it lies at least ``tile_margin`` px from the tile's
    edges (or at the image's edge): a cell then sees about the context it saw at the
    centre of a training crop, not structures half an image away that no crop showed it.
    ``cells`` (the Grad-CAM layer) is the whole image's feature map, stitched from the
    tiles. Training ignores it (it sees crops).
    """

    def __init__(
        self,
        num_classes: int = 2,
        width: int = 32,
        sharpness: float = 4.0,
        mirror: bool = False,
        tile: int = 0,
        tile_margin: int = 0,
        rotation: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes != 2:
            raise ValueError("FractureNet is a binary detector (num_classes must be 2)")
        self.sharpness = sharpness
        self.mirror = mirror
        self.set_rotation(rotation)  # sets rotation
        self.set_tiles(tile, tile_margin)  # sets tile and tile_margin
        self.stem = nn.Sequential(_down(1, width // 2), _down(width // 2, width))
        self.stage2 = nn.Sequential(_Residual(width), _down(width, 2 * width))
        self.features = nn.Sequential(
            _Residual(2 * width),
            _Residual(2 * width, dilation=2),
            _Residual(2 * width, dilation=4),
            _Residual(2 * width, dilation=8),
        )
        self.cells = nn.Identity()  # the image's cell features (stitched when tiled)
        self.evidence = nn.Conv2d(2 * width, 1, kernel_size=1)

    def set_tiles(self, tile: int, margin: int) -> None:
        """Score in tiles of ``tile`` px keeping ``margin`` px of context (``tile`` 0: off).

        Raises:
            ValueError: sizes that are not multiples of 8 (a cell), or a margin that
                leaves no cell to a tile.
        """
        check_tiles(tile, margin)
        self.tile, self.tile_margin = tile, margin

    def set_rotation(self, degrees: float) -> None:
        """Also score each image turned by +/- ``degrees`` (0: off).

        Raises:
            ValueError: a turn outside 0-45 degrees.
        """
        check_rotation(degrees)
        self.rotation = float(degrees)

    @property
    def views(self) -> int:
        """Images each image is scored as in eval mode, before mirroring (1 or 3)."""
        return 3 if self.rotation and not self.training else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = self.views
        if views > 1:
            x = torch.cat([x, rotate(x, self.rotation), rotate(x, -self.rotation)])
        both = self.mirror and not self.training
        if both:
            x = torch.cat([x, x.flip(-1)])
        if self.tile and not self.training:
            features = self._tiled_features(x)
        else:
            features = self._cell_features(x)
        evidence = self.evidence(self.cells(features))
        if both:
            half = evidence.shape[0] // 2
            evidence = (evidence[:half] + evidence[half:].flip(-1)) / 2
        flat = evidence.flatten(1) * self.sharpness
        cells = torch.log(torch.tensor(float(flat.shape[1]), device=x.device))
        z = (torch.logsumexp(flat, dim=1) - cells) / self.sharpness
        if views > 1:  # the mean log-odds of the image's views
            z = z.view(views, -1).mean(0)
        return torch.stack([torch.zeros_like(z), z], dim=1)

    def _cell_features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.features(self.stage2(self.stem(x)))
        return out

    def _tiled_features(self, x: torch.Tensor) -> torch.Tensor:
        height, width = int(x.shape[-2]), int(x.shape[-1])
        rows = tile_spans(height, self.tile, self.tile_margin)
        cols = tile_spans(width, self.tile, self.tile_margin)
        if (len(rows) == 1 and len(cols) == 1) or height % CELL or width % CELL:
            return self._cell_features(x)  # nothing to tile, or off the cell grid
        tile_h, tile_w = min(self.tile, height), min(self.tile, width)
        tiles = torch.cat(
            [
                x[..., top : top + tile_h, left : left + tile_w]
                for top, _, _ in rows
                for left, _, _ in cols
            ]
        )
        flat = self._cell_features(tiles)  # tile by tile, each a run of the B images
        per_tile = flat.reshape(len(rows), len(cols), x.shape[0], *flat.shape[1:])
        out = per_tile.new_empty((x.shape[0], per_tile.shape[3], height // CELL, width // CELL))
        for i, (top, r0, r1) in enumerate(rows):
            for j, (left, c0, c1) in enumerate(cols):
                out[:, :, r0 // CELL : r1 // CELL, c0 // CELL : c1 // CELL] = per_tile[
                    i,
                    j,
                    :,
                    :,
                    (r0 - top) // CELL : (r1 - top) // CELL,
                    (c0 - left) // CELL : (c1 - left) // CELL,
                ]
        return out


CELL = 8  # pixels per cell of FractureNet's evidence map (three stride-2 stages)
MAX_ROTATION = 45.0  # degrees: rotated views beyond this are other projections, not views


def check_rotation(degrees: float) -> None:
    """Refuse a rotated view that is not a small turn (0 is off)."""
    if not (math.isfinite(degrees) and 0.0 <= degrees <= MAX_ROTATION):
        raise ValueError(f"rotation {degrees} degrees: use 0 (off) to {MAX_ROTATION:g}")


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """``images`` (B, C, H, W) turned by ``degrees`` (counter-clockwise on screen) about
    their centre, bilinear, zero outside - as training's augmentation turns them."""
    if not degrees:
        return images
    height, width = int(images.shape[-2]), int(images.shape[-1])
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    # affine_grid works in coordinates normalised per axis: correct the aspect ratio
    theta = torch.tensor(
        [[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]],
        dtype=torch.float32,
        device=images.device,
    )
    grid = F.affine_grid(
        theta.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False
    )
    source = images if images.dtype in (torch.float32, torch.float64) else images.float()
    out = F.grid_sample(
        source, grid.to(source.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out.to(images.dtype)


def check_tiles(tile: int, margin: int) -> None:
    """Refuse tile sizes that :func:`tile_spans` cannot lay on FractureNet's cell grid."""
    if tile == 0 and margin == 0:
        return
    if tile <= 0 or margin < 0 or tile % CELL or margin % CELL:
        raise ValueError(f"tile {tile} px, margin {margin} px: use multiples of {CELL} (tile > 0)")
    if tile - 2 * margin < CELL:
        raise ValueError(f"a {tile} px tile with {margin} px margins owns no cell")


def tile_spans(length: int, tile: int, margin: int) -> list[tuple[int, int, int]]:
    """How tiled scoring covers one axis: ``(tile start, first owned px, end of owned px)``.

    As few tiles of ``tile`` px as leave every owned pixel at least about ``margin`` px
    from its tile's edges (except at the image's own edges), spread evenly from edge to
    edge; each pixel is owned by the tile whose centre is nearest. All values are
    multiples of :data:`CELL` when ``length`` is. One span ``(0, 0, length)`` when the axis
    fits in one tile (or ``tile`` is 0).
    """
    if tile <= 0 or length <= tile:
        return [(0, 0, length)]
    count = -(-(length - 2 * margin) // (tile - 2 * margin))  # at least 2: length > tile
    starts = [_on_grid(i * (length - tile) / (count - 1)) for i in range(count)]
    centres = [start + tile / 2 for start in starts]
    bounds = [0, *(_on_grid((a + b) / 2) for a, b in itertools.pairwise(centres)), length]
    return [(start, bounds[i], bounds[i + 1]) for i, start in enumerate(starts)]


def _on_grid(pixels: float) -> int:
    return round(pixels / CELL) * CELL


def _fracnet(num_classes: int) -> nn.Module:
    return FractureNet(num_classes)


def _efficientnet_b0(num_classes: int) -> nn.Module:
    module: nn.Module = nets.EfficientNetBN(
        "efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=1, num_classes=num_classes
    )
    return module


ARCHITECTURES: dict[str, Architecture] = {
    "densenet121": Architecture(_densenet121, "class_layers.relu"),
    "densenet169": Architecture(_densenet169, "class_layers.relu"),
    "resnet10": Architecture(_resnet(10), "layer4"),
    # half the channels (32-256): the demo's router since round 15, 3.4x faster to train
    # at 128 px on an AVX2 CPU and as accurate on the synthetic body parts
    "resnet10-slim": Architecture(_resnet(10, widen=0.5), "layer4"),
    "resnet18": Architecture(_resnet(18), "layer4"),
    "resnet34": Architecture(_resnet(34), "layer4"),
    "resnet50": Architecture(_resnet(50), "layer4"),
    "efficientnet-b0": Architecture(_efficientnet_b0, "_bn1"),
    "fracnet": Architecture(_fracnet, "cells", evidence_layer="evidence", scoring_options=True),
}


def build_network(architecture: str, num_classes: int) -> nn.Module:
    """A freshly initialised network of the named architecture.

    Raises:
        KeyError: the architecture is not one of :data:`ARCHITECTURES`.
    """
    try:
        spec = ARCHITECTURES[architecture]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise KeyError(f"unknown architecture {architecture!r} (known: {known})") from None
    return spec.build(num_classes)


def gradcam_layer(architecture: str) -> str:
    """The name of the layer Grad-CAM hooks for this architecture."""
    return ARCHITECTURES[architecture].gradcam_layer


def evidence_layer(architecture: str) -> str | None:
    """The layer giving a 1-channel evidence map that a fracture mask can supervise, if any."""
    return ARCHITECTURES[architecture].evidence_layer


def supports_mirror(architecture: str) -> bool:
    """Whether the architecture can score an image together with its mirror image."""
    spec = ARCHITECTURES.get(architecture)
    return spec is not None and spec.scoring_options


def supports_rotation(architecture: str) -> bool:
    """Whether the architecture can score an image as rotated views too."""
    return supports_mirror(architecture)  # the same networks: evidence-map detectors


def supports_tiles(architecture: str) -> bool:
    """Whether the architecture can score an image in tiles of limited context."""
    return supports_mirror(architecture)  # the same networks: evidence-map detectors


def set_mirror(network: nn.Module, on: bool) -> None:
    """Switch mirror scoring (:class:`FractureNet`) on or off.

    Raises:
        ValueError: ``on`` for a network that cannot score mirror images.
    """
    if isinstance(network, FractureNet):
        network.mirror = on
    elif on:
        raise ValueError(f"{type(network).__name__} has no mirror scoring (only fracnet)")


def set_rotation(network: nn.Module, degrees: float) -> None:
    """Switch rotated views (:class:`FractureNet`) on (``degrees`` > 0) or off.

    Raises:
        ValueError: rotated views for a network that cannot score them, or a large turn.
    """
    if isinstance(network, FractureNet):
        network.set_rotation(degrees)
    elif degrees:
        raise ValueError(f"{type(network).__name__} has no rotated views (only fracnet)")


def set_tiles(network: nn.Module, tile: int, margin: int) -> None:
    """Switch tiled scoring (:class:`FractureNet`) on (``tile`` > 0) or off.

    Raises:
        ValueError: tiles for a network that cannot score in tiles, or sizes off the grid.
    """
    if isinstance(network, FractureNet):
        network.set_tiles(tile, margin)
    elif tile:
        raise ValueError(f"{type(network).__name__} has no tiled scoring (only fracnet)")


@contextmanager
def single_pass(network: nn.Module) -> Iterator[None]:
    """Score each whole image once for a while: no mirror image, no rotated views, no tiles
    (a fast scan)."""
    if not isinstance(network, FractureNet):
        yield
        return
    before = network.mirror, network.tile, network.tile_margin, network.rotation
    network.mirror = False
    network.set_tiles(0, 0)
    network.set_rotation(0.0)
    try:
        yield
    finally:
        network.mirror = before[0]
        network.set_tiles(before[1], before[2])
        network.set_rotation(before[3])


CPU_PASS_PIXELS = 2**21  # ~8 images of 512 px per whole-image pass on a CPU (see below)


def scoring_batch(
    network: nn.Module, batch_size: int, height: int, width: int, device: torch.device
) -> int:
    """Images per scoring pass: ``batch_size``, but on a CPU at most :data:`CPU_PASS_PIXELS`.

    A larger pass no longer fits the CPU's caches: FractureNet at 512 px on a 2-core AVX2
    EPYC took ~26 ms per image in passes of up to 6 images and 31-35 ms at 8-16; scored
    with their mirror images 49-55 ms up to 4 images and 65-101 ms at 8-24 (2026-12-07,
    48 images per size; docs/models.md, "Round 12"). An image scored with its mirror
    image is two rows, with rotated views three times as many; an image scored in tiles
    counts the pixels of its tiles.
    """
    if device.type != "cpu":
        return max(1, batch_size)
    pixels = height * width
    if isinstance(network, FractureNet):
        if network.mirror:
            pixels *= 2
        if network.rotation:
            pixels *= 3
        if network.tile:
            pixels = pixels * tiled_pixels(height, width, network.tile, network.tile_margin)
            pixels //= height * width
    return max(1, min(batch_size, CPU_PASS_PIXELS // pixels))


def tiled_pixels(height: int, width: int, tile: int, margin: int) -> int:
    """Pixels an image of ``height`` x ``width`` px is scored on in tiles (see FractureNet)."""
    rows, cols = tile_spans(height, tile, margin), tile_spans(width, tile, margin)
    if len(rows) == 1 and len(cols) == 1:
        return height * width
    return len(rows) * min(tile, height) * len(cols) * min(tile, width)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = [
    "ARCHITECTURES",
    "CPU_PASS_PIXELS",
    "Architecture",
    "FractureNet",
    "build_network",
    "check_rotation",
    "count_parameters",
    "evidence_layer",
    "gradcam_layer",
    "rotate",
    "scoring_batch",
    "set_mirror",
    "set_rotation",
    "set_tiles",
    "single_pass",
    "supports_mirror",
    "supports_rotation",
    "supports_tiles",
    "tile_spans",
    "tiled_pixels",
]
_ = torch  # torch is imported so that importing this module fails loudly without it
