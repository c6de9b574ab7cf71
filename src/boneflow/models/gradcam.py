"""Grad-CAM (MONAI ``monai.visualize.GradCAM``) on a fracture model, plus the hotspot box.

One pass gives both the logits and the map: the network runs with gradients switched on
only from the Grad-CAM layer onwards. A forward hook on that layer hands the rest of the
network a detached copy of the activation that requires grad, so no graph is built through
the earlier layers (their parameters are frozen at load) and the backward pass runs through
the head alone. The weighting (mean gradient per channel), ReLU and upsampling to the input
size are MONAI's; the map is then scaled so that its maximum is 1 (MONAI's default
normaliser flips min and max, which is not what an overlay wants).

A network that scores mirror images too (``FractureNet.mirror``) runs the Grad-CAM layer
on 2B rows, the B images and then their mirror images; the map of each mirror image is
flipped back and averaged with the image's own before scaling, so the heat shows what
the averaged evidence map the score came from shows. One that scores rotated views too
(``FractureNet.rotation``) runs it on three times as many rows: each turned view's map is
turned back onto the image and the three are averaged, as their logits are. A network
that scores in tiles (``FractureNet.tile``) hands Grad-CAM its stitched feature map (the
``cells`` layer), one row per image, so the map covers the image as the score does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.visualize.class_activation_maps import GradCAM, ModelWithHooks
from torch import nn

from boneflow.findings import BoundingBox
from boneflow.models.networks import rotate

FloatArray = npt.NDArray[np.float32]


class FractureGradCAM:
    """Logits and Grad-CAM maps of one network for a batch, in one pass.

    Args:
        network: a classifier in eval mode (its parameters are set not to require grad).
        layer: the name of the Grad-CAM layer (``networks.gradcam_layer(arch)``).
        class_index: the class whose log-odds the map explains (1 = fracture).
    """

    def __init__(self, network: nn.Module, layer: str, class_index: int = 1) -> None:
        network.eval()
        network.requires_grad_(False)
        self.network = network
        self.class_index = class_index
        self._hooks = _HeadOnlyHooks(network, layer)
        self._cam = GradCAM(nn_module=self._hooks, target_layers=layer, postprocessing=_as_is)

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits (B, K), maps (B, H, W) in 0..1 on the input grid)``."""
        with torch.inference_mode(False), torch.enable_grad():
            maps = torch.as_tensor(self._cam(batch, class_idx=self.class_index)).detach()[:, 0]
        logits = self._hooks.last_logits
        assert logits is not None  # set by the pass above
        images = logits.shape[0]
        rotation = float(getattr(self.network, "rotation", 0.0) or 0.0)
        views = 3 if rotation else 1
        if maps.shape[0] == 2 * views * images:  # mirror scoring: the rows, then their mirrors
            half = maps.shape[0] // 2
            maps = (maps[:half] + maps[half:].flip(-1)) / 2
        if views > 1:  # the image, turned by +rotation, by -rotation: turn them back
            turned = maps.view(views, images, 1, *maps.shape[-2:])
            maps = (turned[0] + rotate(turned[1], -rotation) + rotate(turned[2], rotation))[
                :, 0
            ] / 3
        return logits.detach(), _to_unit_max(maps)


def hotspot(heatmap: FloatArray, level: float = 0.5) -> BoundingBox | None:
    """The box around the connected region at or above ``level`` that holds the peak.

    Returns None for an empty or all-zero map.
    """
    if heatmap.size == 0 or not np.isfinite(heatmap).all() or float(heatmap.max()) <= 0:
        return None
    import cv2  # local: only needed here

    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    mask = (heatmap >= level * float(heatmap.max())).astype(np.uint8)
    _, labels = cv2.connectedComponents(mask, connectivity=8)
    rows, cols = np.nonzero(labels == labels[peak])
    return BoundingBox(
        row_min=int(rows.min()),
        col_min=int(cols.min()),
        row_max=int(rows.max()) + 1,
        col_max=int(cols.max()) + 1,
    )


# --- helpers -----------------------------------------------------------------------------------


class _HeadOnlyHooks(ModelWithHooks):  # type: ignore[misc]  # monai is untyped
    """MONAI's hook wrapper, but the graph starts at the target layer (see module doc)."""

    def __init__(self, network: nn.Module, layer: str) -> None:
        super().__init__(network, layer, register_forward=False, register_backward=False)
        self.layer = layer
        self.last_logits: torch.Tensor | None = None
        self._capture = False
        self._activation: torch.Tensor | None = None
        target = self.get_layer(layer)
        target.register_forward_hook(self._cut)

    def _cut(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not self._capture:
            return None
        activation = output.detach().requires_grad_(True)
        self._activation = activation
        return activation

    def __call__(
        self, x: torch.Tensor, class_idx: int | None = None, retain_graph: bool = False, **_: Any
    ) -> tuple[torch.Tensor, tuple[torch.Tensor], tuple[torch.Tensor]]:
        self._capture = True
        try:
            logits = self.model(x)
        finally:
            self._capture = False
        activation = self._activation
        self._activation = None
        if activation is None:
            raise RuntimeError(f"Grad-CAM layer {self.layer!r} did not run")
        index = int(logits.argmax(1)[0]) if class_idx is None else class_idx
        score = _log_odds(logits.float(), index)
        (gradient,) = torch.autograd.grad(score.sum(), activation, retain_graph=retain_graph)
        self.last_logits = logits
        return logits, (activation.detach(),), (gradient.contiguous(),)


def _log_odds(logits: torch.Tensor, index: int) -> torch.Tensor:
    """log P(class) - log P(not class): for two classes, the logit difference."""
    others = torch.cat([logits[:, :index], logits[:, index + 1 :]], dim=1)
    return logits[:, index] - torch.logsumexp(others, dim=1)


def _as_is(maps: torch.Tensor) -> torch.Tensor:
    return maps


def _to_unit_max(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map so that its maximum is 1; a map without evidence (all ~0) becomes 0."""
    flat = maps.reshape(maps.shape[0], -1).float()
    peak = flat.max(dim=1).values
    scale = torch.where(peak > _NO_EVIDENCE, 1.0 / peak.clamp_min(_NO_EVIDENCE), 0.0)
    return (flat * scale[:, None]).reshape(maps.shape)


_NO_EVIDENCE = 1e-8  # a raw Grad-CAM peak below this is rounding noise, not a signal


__all__ = ["FractureGradCAM", "hotspot"]
