"""Preprocessing shared by inference and training: one definition, MONAI transform pairs.

A display-ready radiograph (float, bone bright, any size) becomes a ``(1, S, S)`` float32
tensor in ``[0, 1]``:

1. aspect-preserving resize so that the longer side is ``S`` (OpenCV, area interpolation),
2. robust intensity normalisation (percentiles of the image content, clipped to 0..1),
3. CLAHE (OpenCV; clip limit 2.0 and 8x8 tiles by default),
4. centred zero padding to ``S x S``.

Resizing first keeps the hot path cheap (CLAHE and percentiles run on ~50k pixels, not on
3M) and makes the CLAHE tiles cover the same fraction of the anatomy whatever the detector
size. Normalisation and CLAHE run before padding so that the padding never enters the
percentiles or the CLAHE histograms. :class:`Geometry` records the resize and pad so that a
heat map on the ``S x S`` input maps back onto the source pixel grid
(:func:`unmap_heatmap`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import torch
from monai.transforms.compose import Compose
from monai.transforms.intensity.dictionary import (
    RandAdjustContrastd,
    RandGaussianNoised,
    RandScaleIntensityd,
    ScaleIntensityRanged,
)
from monai.transforms.spatial.dictionary import RandAffined, RandFlipd
from monai.transforms.transform import MapTransform, Transform
from monai.transforms.utility.dictionary import EnsureTyped

from boneflow.findings import BoundingBox

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class PreprocessParams:
    """How a radiograph becomes a network input; stored in every model's manifest."""

    input_size: int = 224
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5

    def __post_init__(self) -> None:
        if self.input_size < 16:
            raise ValueError(f"input_size must be at least 16, not {self.input_size}")
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ValueError("need 0 <= lower_percentile < upper_percentile <= 100")
        if self.clahe_clip_limit < 0 or self.clahe_tile_grid < 1:
            raise ValueError("clahe_clip_limit must be >= 0 (0 = off) and clahe_tile_grid >= 1")

    def to_dict(self) -> dict[str, float | int]:
        """A JSON-ready dict (the manifest's ``preprocessing``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessParams:
        """Read back :meth:`to_dict`; unknown keys are ignored, missing ones default."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for name in ("input_size", "clahe_tile_grid"):
            if name in values:
                values[name] = int(values[name])
        for name in ("clahe_clip_limit", "lower_percentile", "upper_percentile"):
            if name in values:
                values[name] = float(values[name])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Geometry:
    """How the source grid maps onto the ``S x S`` input: scale, then centred padding.

    ``source_shape`` and ``resized_shape`` are (rows, columns); the resized image sits at
    ``[pad_top : pad_top + rows, pad_left : pad_left + columns]`` of the input.
    """

    source_shape: tuple[int, int]
    resized_shape: tuple[int, int]
    pad_top: int
    pad_left: int
    input_size: int

    @property
    def scale(self) -> float:
        """Input pixels per source pixel."""
        return self.resized_shape[0] / self.source_shape[0]

    def content(self, array: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The part of an ``S x S`` array that holds the image (the padding cut off)."""
        rows, cols = self.resized_shape
        return array[self.pad_top : self.pad_top + rows, self.pad_left : self.pad_left + cols]

    def box_to_source(self, box: BoundingBox) -> BoundingBox:
        """A box on the :meth:`content` grid, in source pixels (end-exclusive, clipped)."""
        rows, cols = self.source_shape
        row_scale = rows / self.resized_shape[0]
        col_scale = cols / self.resized_shape[1]
        return BoundingBox(
            row_min=max(0, math.floor(box.row_min * row_scale)),
            col_min=max(0, math.floor(box.col_min * col_scale)),
            row_max=min(rows, math.ceil(box.row_max * row_scale)),
            col_max=min(cols, math.ceil(box.col_max * col_scale)),
        )

    def content_mask(self) -> npt.NDArray[np.bool_]:
        """True where the input holds image content, False in the padding."""
        mask = np.zeros((self.input_size, self.input_size), dtype=bool)
        rows, cols = self.resized_shape
        mask[self.pad_top : self.pad_top + rows, self.pad_left : self.pad_left + cols] = True
        return mask


def preprocess(image: npt.ArrayLike, params: PreprocessParams) -> tuple[FloatArray, Geometry]:
    """Turn a display-ready radiograph into the network input.

    Args:
        image: 2-D array (rows x columns), or ``(1, rows, columns)``, bone bright.
        params: the model's preprocessing parameters.

    Returns:
        A ``(1, S, S)`` float32 array in ``[0, 1]`` and the :class:`Geometry` to undo it.

    Raises:
        ValueError: the image is not 2-D, is empty or holds no finite values.
    """
    array = _as_2d(image)
    resized, geometry = resize_to_fit(array, params.input_size)
    normalised = robust_normalise(resized, params.lower_percentile, params.upper_percentile)
    enhanced = clahe(normalised, params.clahe_clip_limit, params.clahe_tile_grid)
    return pad_to_square(enhanced, geometry)[None], geometry


def unmap_heatmap(heatmap: npt.ArrayLike, geometry: Geometry) -> FloatArray:
    """Map a heat map over the ``S x S`` input back onto the source pixel grid.

    The padding is cut off, then the rest is resized (bilinear) to the source shape. A map of
    another square size (e.g. a feature-map-sized CAM) is first resized to ``S x S``.
    """
    array: FloatArray = np.squeeze(np.asarray(heatmap, dtype=np.float32))
    if array.ndim != 2:
        raise ValueError(f"heat map must be 2-D, got shape {np.shape(heatmap)}")
    size = geometry.input_size
    if array.shape != (size, size):
        array = np.asarray(cv2.resize(array, (size, size)), dtype=np.float32)
    crop = geometry.content(array)
    src_rows, src_cols = geometry.source_shape
    out = cv2.resize(
        np.ascontiguousarray(crop), (src_cols, src_rows), interpolation=cv2.INTER_LINEAR
    )
    return np.asarray(out, dtype=np.float32)


# --- the numpy + OpenCV steps (the hot path) ------------------------------------------------


def resize_to_fit(image: FloatArray, size: int) -> tuple[FloatArray, Geometry]:
    """Resize so that the longer side is ``size``, keeping the aspect ratio."""
    rows, cols = image.shape
    scale = size / max(rows, cols)
    new_rows = max(1, min(size, round(rows * scale)))
    new_cols = max(1, min(size, round(cols * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_cols, new_rows), interpolation=interpolation)
    geometry = Geometry(
        source_shape=(rows, cols),
        resized_shape=(new_rows, new_cols),
        pad_top=(size - new_rows) // 2,
        pad_left=(size - new_cols) // 2,
        input_size=size,
    )
    return np.asarray(resized, dtype=np.float32), geometry


def pad_to_square(image: FloatArray, geometry: Geometry) -> FloatArray:
    """Place the resized image in the centre of a zero ``S x S`` canvas."""
    size = geometry.input_size
    out = np.zeros((size, size), dtype=np.float32)
    rows, cols = geometry.resized_shape
    out[
        geometry.pad_top : geometry.pad_top + rows, geometry.pad_left : geometry.pad_left + cols
    ] = image
    return out


def robust_normalise(image: FloatArray, lower: float = 0.5, upper: float = 99.5) -> FloatArray:
    """Scale so that the ``lower``/``upper`` percentiles map to 0/1, then clip to 0..1.

    Raises:
        ValueError: the image holds no finite values.
    """
    finite = image[np.isfinite(image)] if not np.isfinite(image).all() else image
    if finite.size == 0:
        raise ValueError("image holds no finite pixel values")
    low, high = np.percentile(finite, (lower, upper))
    span = float(high - low)
    if span <= 1e-6 * max(1.0, abs(float(high))):  # flat (up to resampling noise): keep it flat
        return np.zeros(image.shape, dtype=np.float32)
    out = (np.nan_to_num(image, nan=float(low)) - np.float32(low)) * np.float32(1.0 / span)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def clahe(image: FloatArray, clip_limit: float = 2.0, tile_grid: int = 8) -> FloatArray:
    """OpenCV's CLAHE on an image in ``[0, 1]`` (8-bit internally); 0 clip limit = off."""
    if clip_limit <= 0:
        return image.astype(np.float32, copy=False)
    as_uint8 = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    operator = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(tile_grid, tile_grid))
    enhanced = operator.apply(as_uint8)
    return enhanced.astype(np.float32) * np.float32(1.0 / 255.0)


# --- MONAI transform pairs --------------------------------------------------------------------


class Clahe(Transform):  # type: ignore[misc]  # monai is untyped
    """CLAHE (OpenCV) on a ``(H, W)`` or ``(1, H, W)`` image in ``[0, 1]``."""

    def __init__(self, clip_limit: float = 2.0, tile_grid: int = 8) -> None:
        self.clip_limit = clip_limit
        self.tile_grid = tile_grid

    def __call__(self, img: Any) -> Any:
        return _channel_wise(img, lambda a: clahe(a, self.clip_limit, self.tile_grid))


class RobustNormalise(Transform):  # type: ignore[misc]  # monai is untyped
    """Percentile normalisation to ``[0, 1]`` of a ``(H, W)`` or ``(1, H, W)`` image."""

    def __init__(self, lower: float = 0.5, upper: float = 99.5) -> None:
        self.lower = lower
        self.upper = upper

    def __call__(self, img: Any) -> Any:
        return _channel_wise(img, lambda a: robust_normalise(a, self.lower, self.upper))


class PadResize(Transform):  # type: ignore[misc]  # monai is untyped
    """Aspect-preserving resize to fit ``size`` plus centred zero padding to ``size²``."""

    def __init__(self, size: int = 224) -> None:
        self.size = size

    def __call__(self, img: Any) -> Any:
        def run(array: FloatArray) -> FloatArray:
            resized, geometry = resize_to_fit(array, self.size)
            return pad_to_square(resized, geometry)

        return _channel_wise(img, run)


class Preprocess(Transform):  # type: ignore[misc]  # monai is untyped
    """The whole of :func:`preprocess` as one MONAI transform: ``(H, W)`` → ``(1, S, S)``."""

    def __init__(self, params: PreprocessParams | None = None) -> None:
        self.params = params or PreprocessParams()

    def __call__(self, img: Any) -> Any:
        tensor, _ = preprocess(_to_numpy(img), self.params)
        return tensor


class Clahed(MapTransform):  # type: ignore[misc]  # monai is untyped
    """Dictionary version of :class:`Clahe`."""

    def __init__(
        self,
        keys: str | Sequence[Hashable],
        clip_limit: float = 2.0,
        tile_grid: int = 8,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = Clahe(clip_limit, tile_grid)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return _apply(self, data, self.transform)


class RobustNormalised(MapTransform):  # type: ignore[misc]  # monai is untyped
    """Dictionary version of :class:`RobustNormalise`."""

    def __init__(
        self,
        keys: str | Sequence[Hashable],
        lower: float = 0.5,
        upper: float = 99.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = RobustNormalise(lower, upper)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return _apply(self, data, self.transform)


class PadResized(MapTransform):  # type: ignore[misc]  # monai is untyped
    """Dictionary version of :class:`PadResize`."""

    def __init__(
        self, keys: str | Sequence[Hashable], size: int = 224, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = PadResize(size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return _apply(self, data, self.transform)


class Preprocessd(MapTransform):  # type: ignore[misc]  # monai is untyped
    """Dictionary version of :class:`Preprocess`."""

    def __init__(
        self,
        keys: str | Sequence[Hashable],
        params: PreprocessParams | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = Preprocess(params)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return _apply(self, data, self.transform)


def training_transforms(params: PreprocessParams, augment: bool, seed: int = 0) -> Compose:
    """Dictionary transforms over ``"image"`` (and a pass-through ``"label"``) for training.

    ``"image"`` is a display-ready ``(H, W)`` or ``(1, H, W)`` array, bone bright; the output
    ``"image"`` is a ``(1, S, S)`` float32 tensor, exactly :func:`preprocess` when
    ``augment`` is false. With ``augment``, random rotation (±10°), left-right flip, zoom
    (0.9-1.1), shift (±6 %) and intensity changes (gamma, scale, noise) follow, seeded by
    ``seed`` so that a run can be repeated.
    """
    keys = ["image"]
    steps: list[Any] = [Preprocessd(keys, params)]
    if augment:
        shift = 0.06 * params.input_size
        steps += [
            RandAffined(
                keys,
                prob=0.8,
                rotate_range=np.deg2rad(10.0),
                scale_range=0.1,
                translate_range=(shift, shift),
                padding_mode="zeros",
                mode="bilinear",
            ),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandAdjustContrastd(keys, prob=0.5, gamma=(0.8, 1.25)),
            RandScaleIntensityd(keys, factors=0.1, prob=0.3),
            RandGaussianNoised(keys, prob=0.2, std=0.02),
            # keep the 0..1 range preprocess() promises
            ScaleIntensityRanged(keys, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        ]
    steps.append(EnsureTyped(["image"], data_type="tensor", dtype=torch.float32, track_meta=False))
    steps.append(
        EnsureTyped(["label"], data_type="tensor", track_meta=False, allow_missing_keys=True)
    )
    composed = Compose(steps)
    composed.set_random_state(seed=seed)
    return composed


# --- helpers -----------------------------------------------------------------------------------


def _as_2d(image: npt.ArrayLike) -> FloatArray:
    array = np.asarray(_to_numpy(image), dtype=np.float32)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"expected a 2-D image, got shape {array.shape}")
    return array


def _to_numpy(img: Any) -> Any:
    if isinstance(img, torch.Tensor):
        return img.detach().cpu().numpy()
    return img


def _channel_wise(img: Any, fn: Any) -> Any:
    """Apply a 2-D numpy function to ``(H, W)`` or each channel of ``(C, H, W)``."""
    was_tensor = isinstance(img, torch.Tensor)
    array = np.asarray(_to_numpy(img), dtype=np.float32)
    if array.ndim == 2:
        out = fn(array)
    elif array.ndim == 3:
        out = np.stack([fn(channel) for channel in array])
    else:
        raise ValueError(f"expected (H, W) or (C, H, W), got shape {array.shape}")
    return torch.from_numpy(out) if was_tensor else out


def _apply(
    transform: MapTransform, data: Mapping[Hashable, Any], fn: Transform
) -> dict[Hashable, Any]:
    out = dict(data)
    for key in transform.key_iterator(out):
        out[key] = fn(out[key])
    return out


__all__ = [
    "Clahe",
    "Clahed",
    "Geometry",
    "PadResize",
    "PadResized",
    "Preprocess",
    "PreprocessParams",
    "Preprocessd",
    "RobustNormalise",
    "RobustNormalised",
    "clahe",
    "pad_to_square",
    "preprocess",
    "resize_to_fit",
    "robust_normalise",
    "training_transforms",
    "unmap_heatmap",
]
