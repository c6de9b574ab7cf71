"""Preprocessing: shapes and ranges on real radiographs, geometry round trip, MONAI pairs."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import torch

from boneflow.findings import BoundingBox
from boneflow.models.transforms import (
    Clahe,
    Clahed,
    Geometry,
    PadResize,
    PadResized,
    Preprocess,
    Preprocessd,
    PreprocessParams,
    RobustNormalise,
    RobustNormalised,
    preprocess,
    training_transforms,
    unmap_heatmap,
)

Pixels = dict[str, npt.NDArray[np.float32]]


@pytest.mark.parametrize("name", ["RG1_UNCR", "RG1_J2KI", "RG3_UNCR", "RG3_J2KR"])
def test_real_radiograph_becomes_a_unit_range_square(name: str, radiograph_pixels: Pixels) -> None:
    tensor, geometry = preprocess(radiograph_pixels[name], PreprocessParams())
    assert tensor.shape == (1, 224, 224)
    assert tensor.dtype == np.float32
    assert float(tensor.min()) >= 0.0
    assert float(tensor.max()) <= 1.0
    content = tensor[0][geometry.content_mask()]
    assert float(content.std()) > 0.1  # an image, not a flat field
    assert geometry.source_shape == radiograph_pixels[name].shape


def test_non_square_image_is_padded_with_zeros_and_centred(radiograph_pixels: Pixels) -> None:
    tensor, geometry = preprocess(radiograph_pixels["RG1_UNCR"], PreprocessParams())
    assert geometry.source_shape == (1955, 1841)
    assert geometry.resized_shape == (224, 211)  # aspect kept: 1841 / 1955 * 224
    assert (geometry.pad_top, geometry.pad_left) == (0, 6)
    padding = ~geometry.content_mask()
    assert padding.sum() == 224 * 13
    assert np.all(tensor[0][padding] == 0.0)


def test_input_size_is_configurable(radiograph_pixels: Pixels) -> None:
    tensor, geometry = preprocess(radiograph_pixels["RG3_UNCR"], PreprocessParams(input_size=96))
    assert tensor.shape == (1, 96, 96)
    assert geometry.input_size == 96


def test_clahe_enhances_local_contrast(radiograph_pixels: Pixels) -> None:
    image = radiograph_pixels["RG3_UNCR"]
    plain, _ = preprocess(image, PreprocessParams(clahe_clip_limit=0.0))
    enhanced, _ = preprocess(image, PreprocessParams())

    def block_std(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(x[0].reshape(28, 8, 28, 8).std(axis=(1, 3)))

    anatomy = block_std(plain) > 0.005  # not the flat collimated border
    assert anatomy.sum() > 100
    # the typical (median) block gains contrast; strong edges are what CLAHE clips
    assert np.median(block_std(enhanced)[anatomy]) > 1.2 * np.median(block_std(plain)[anatomy])


def test_heatmap_maps_back_onto_the_source_grid() -> None:
    source = np.zeros((300, 200), dtype=np.float32)
    source[100:140, 50:90] = 1.0  # a bright square
    _, geometry = preprocess(source, PreprocessParams(input_size=64))
    # a heat map that is hot exactly where the square lands in the input
    heat_input = np.zeros((64, 64), dtype=np.float32)
    scale = geometry.scale
    r0, c0 = geometry.pad_top + int(100 * scale), geometry.pad_left + int(50 * scale)
    heat_input[r0 : r0 + int(40 * scale), c0 : c0 + int(40 * scale)] = 1.0
    back = unmap_heatmap(heat_input, geometry)
    assert back.shape == (300, 200)
    peak_rows, peak_cols = np.nonzero(back > 0.9)
    assert peak_rows.min() >= 95 and peak_rows.max() <= 145
    assert peak_cols.min() >= 45 and peak_cols.max() <= 95


def test_unmap_accepts_a_feature_map_sized_heatmap() -> None:
    geometry = Geometry((100, 50), (64, 32), 0, 16, 64)
    back = unmap_heatmap(np.ones((1, 4, 4), dtype=np.float32), geometry)
    assert back.shape == (100, 50)
    np.testing.assert_allclose(back, 1.0)


def test_bad_images_are_refused() -> None:
    with pytest.raises(ValueError, match="2-D"):
        preprocess(np.zeros((2, 3, 4), dtype=np.float32), PreprocessParams())
    with pytest.raises(ValueError, match="finite"):
        preprocess(np.full((20, 20), np.nan, dtype=np.float32), PreprocessParams())


def test_flat_image_stays_flat() -> None:
    params = PreprocessParams(input_size=32)
    tensor, geometry = preprocess(np.full((50, 40), 0.3, dtype=np.float32), params)
    content = tensor[0][geometry.content_mask()]
    assert float(content.max()) == float(content.min())


def test_params_round_trip_and_validate() -> None:
    params = PreprocessParams(input_size=192, clahe_clip_limit=3.0, clahe_tile_grid=4)
    assert PreprocessParams.from_dict(params.to_dict()) == params
    assert PreprocessParams.from_dict({"input_size": "128", "unknown": 1}).input_size == 128
    with pytest.raises(ValueError):
        PreprocessParams(lower_percentile=60, upper_percentile=40)
    with pytest.raises(ValueError):
        PreprocessParams(input_size=4)


def test_monai_array_transforms_match_opencv(radiograph_pixels: Pixels) -> None:
    image = radiograph_pixels["RG3_UNCR"][::8, ::8].copy()
    normalised = RobustNormalise(1.0, 99.0)(image)
    low, high = np.percentile(image, (1.0, 99.0))
    np.testing.assert_allclose(normalised, np.clip((image - low) / (high - low), 0, 1), atol=1e-6)
    as_uint8 = (normalised * 255 + 0.5).astype(np.uint8)
    expected = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(as_uint8) / 255.0
    np.testing.assert_allclose(Clahe(2.0, 8)(normalised), expected, atol=1e-6)
    padded = PadResize(64)(torch.from_numpy(image[None]))
    assert isinstance(padded, torch.Tensor)
    assert padded.shape == (1, 64, 64)


def test_monai_dict_transforms_match_the_array_ones(radiograph_pixels: Pixels) -> None:
    image = radiograph_pixels["RG1_UNCR"][::4, ::4].copy()
    data = {"image": image, "label": 1}
    assert np.array_equal(RobustNormalised("image")(data)["image"], RobustNormalise()(image))
    assert np.array_equal(Clahed("image")(data)["image"], Clahe()(np.clip(image, 0, 1)))
    assert np.array_equal(PadResized("image", size=32)(data)["image"], PadResize(32)(image))
    params = PreprocessParams(input_size=48)
    out = Preprocessd("image", params)(data)
    assert np.array_equal(out["image"], preprocess(image, params)[0])
    assert np.array_equal(Preprocess(params)(image), out["image"])
    assert out["label"] == 1


def test_training_transforms_without_augmentation_are_preprocess(radiograph_pixels: Pixels) -> None:
    image = radiograph_pixels["RG3_J2KR"]
    params = PreprocessParams(input_size=64)
    out = training_transforms(params, augment=False)({"image": image, "label": 1})
    assert isinstance(out["image"], torch.Tensor)
    assert out["image"].dtype == torch.float32
    np.testing.assert_array_equal(out["image"].numpy(), preprocess(image, params)[0])
    assert int(out["label"]) == 1


def test_augmentation_is_seeded_and_stays_in_range(radiograph_pixels: Pixels) -> None:
    image = radiograph_pixels["RG3_UNCR"][::4, ::4].copy()
    params = PreprocessParams(input_size=64)

    def run(seed: int) -> list[torch.Tensor]:
        transform = training_transforms(params, augment=True, seed=seed)
        return [transform({"image": image, "label": 0})["image"] for _ in range(4)]

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    plain = torch.from_numpy(preprocess(image, params)[0])
    assert any(not torch.equal(a, plain) for a in first)  # something was augmented
    for tensor in first + other:
        assert tensor.shape == (1, 64, 64)
        assert float(tensor.min()) >= 0.0
        assert float(tensor.max()) <= 1.0


def test_box_on_the_small_map_scales_to_the_source_grid() -> None:
    source = np.zeros((1955, 1841), dtype=np.float32)
    _, geometry = preprocess(source + np.linspace(0, 1, 1841, dtype=np.float32), PreprocessParams())
    assert geometry.content(np.zeros((224, 224), dtype=np.float32)).shape == (224, 211)
    box = geometry.box_to_source(BoundingBox(row_min=112, col_min=0, row_max=224, col_max=211))
    assert box == BoundingBox(row_min=977, col_min=0, row_max=1955, col_max=1841)


def test_heat_in_the_padding_never_reaches_the_source(radiograph_pixels: Pixels) -> None:
    _, geometry = preprocess(radiograph_pixels["RG1_UNCR"], PreprocessParams())
    heat = np.zeros((224, 224), dtype=np.float32)
    heat[~geometry.content_mask()] = 1.0  # hot only in the padding
    heat[100, 100] = 0.5  # and a little on the image
    back = unmap_heatmap(heat, geometry)
    assert back.shape == (1955, 1841)
    assert float(back.max()) <= 0.5
    row, col = np.unravel_index(int(np.argmax(back)), back.shape)
    assert abs(row - 100 / geometry.scale) < 15
    assert abs(col - (100 - geometry.pad_left) / geometry.scale) < 15
