"""The networks boneflow trains (MONAI implementations) and each one's Grad-CAM layer.

Every network takes one grey channel and returns logits. The Grad-CAM target layer of each
architecture is named here and only here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from monai.networks import nets
from torch import nn


@dataclass(frozen=True, slots=True)
class Architecture:
    """How to build one network and where Grad-CAM looks."""

    build: Callable[[int], nn.Module]
    gradcam_layer: str


def _densenet121(num_classes: int) -> nn.Module:
    module: nn.Module = nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=num_classes)
    return module


def _densenet169(num_classes: int) -> nn.Module:
    module: nn.Module = nets.DenseNet169(spatial_dims=2, in_channels=1, out_channels=num_classes)
    return module


def _resnet(depth: int) -> Callable[[int], nn.Module]:
    factory = {10: nets.resnet10, 18: nets.resnet18, 34: nets.resnet34, 50: nets.resnet50}[depth]

    def build(num_classes: int) -> nn.Module:
        # MONAI keeps a stride-1 stem by default; stride 2 is the usual ImageNet stem and
        # 2.5x faster at 224 px with no loss on radiographs of this size.
        module: nn.Module = factory(
            spatial_dims=2, n_input_channels=1, num_classes=num_classes, conv1_t_stride=2
        )
        return module

    return build


def _efficientnet_b0(num_classes: int) -> nn.Module:
    module: nn.Module = nets.EfficientNetBN(
        "efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=1, num_classes=num_classes
    )
    return module


ARCHITECTURES: dict[str, Architecture] = {
    "densenet121": Architecture(_densenet121, "class_layers.relu"),
    "densenet169": Architecture(_densenet169, "class_layers.relu"),
    "resnet10": Architecture(_resnet(10), "layer4"),
    "resnet18": Architecture(_resnet(18), "layer4"),
    "resnet34": Architecture(_resnet(34), "layer4"),
    "resnet50": Architecture(_resnet(50), "layer4"),
    "efficientnet-b0": Architecture(_efficientnet_b0, "_bn1"),
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


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["ARCHITECTURES", "Architecture", "build_network", "count_parameters", "gradcam_layer"]
_ = torch  # torch is imported so that importing this module fails loudly without it
