"""read_pixels on the real CR radiographs of pydicom-data, in every transfer syntax we accept."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from boneflow.dicom.pixels import laterality, read_pixels
from boneflow.errors import UnreadableInstance


def _load(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom-data lacks {name}"
    return pydicom.dcmread(str(path))


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """Display pixels of the uncompressed originals."""
    return {p: read_pixels(_load(f"{p}_UNCR.dcm")) for p in ("RG1", "RG3")}


# dcmtk converts RG3 (uncompressed, 10 bits stored) into each other syntax we accept.
_DCMTK: dict[str, tuple[list[str], str, bool]] = {
    "implicit": (["dcmconv", "+ti"], ImplicitVRLittleEndian, True),
    "deflate": (["dcmconv", "+td"], DeflatedExplicitVRLittleEndian, True),
    "rle": (["dcmcrle"], RLELossless, True),
    "jpeg-lossless-sv1": (["dcmcjpeg", "+e1"], JPEGLosslessSV1, True),
    "jpeg-extended": (["dcmcjpeg", "+ee"], JPEGExtended12Bit, False),
    "jpeg-ls-lossless": (["dcmcjpls", "+el"], JPEGLSLossless, True),
    "jpeg-ls-near-lossless": (["dcmcjpls", "+en"], JPEGLSNearLossless, False),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Dataset]:
    source = get_testdata_file("RG3_UNCR.dcm")
    folder = tmp_path_factory.mktemp("syntaxes")

    def convert(kind: str) -> Dataset:
        command, _, _ = _DCMTK[kind]
        target = folder / f"{kind}.dcm"
        if not target.exists():
            subprocess.run([*command, str(source), str(target)], check=True, timeout=120)
        return pydicom.dcmread(target)

    return convert


@pytest.mark.parametrize("prefix", ["RG1", "RG3"])
@pytest.mark.parametrize("suffix", ["UNCR", "J2KR", "J2KI"])
def test_every_pydicom_data_syntax_decodes_to_unit_range(prefix: str, suffix: str) -> None:
    ds = _load(f"{prefix}_{suffix}.dcm")
    pixels = read_pixels(ds)
    assert pixels.dtype == np.float32
    assert pixels.shape == (ds.Rows, ds.Columns)
    assert 0.0 <= float(pixels.min()) < float(pixels.max()) <= 1.0


@pytest.mark.parametrize("prefix", ["RG1", "RG3"])
def test_jpeg2000_lossless_is_identical_and_lossy_is_close(
    prefix: str, reference: dict[str, np.ndarray]
) -> None:
    lossless = read_pixels(_load(f"{prefix}_J2KR.dcm"))
    lossy = read_pixels(_load(f"{prefix}_J2KI.dcm"))
    assert _load(f"{prefix}_J2KR.dcm").file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert _load(f"{prefix}_J2KI.dcm").file_meta.TransferSyntaxUID == JPEG2000
    np.testing.assert_array_equal(lossless, reference[prefix])
    assert not np.array_equal(lossy, reference[prefix])  # really lossy
    assert float(np.abs(lossy - reference[prefix]).mean()) < 0.01


@pytest.mark.parametrize("kind", sorted(_DCMTK))
def test_dcmtk_encoded_syntaxes_agree_with_the_original(
    kind: str, converted: Callable[[str], Dataset], reference: dict[str, np.ndarray]
) -> None:
    _, syntax, lossless = _DCMTK[kind]
    ds = converted(kind)
    assert ds.file_meta.TransferSyntaxUID == syntax
    pixels = read_pixels(ds)
    if lossless:
        np.testing.assert_array_equal(pixels, reference["RG3"])
    else:
        assert float(np.abs(pixels - reference["RG3"]).mean()) < 0.01


def test_jpeg_baseline_of_an_8_bit_image(tmp_path: Path) -> None:
    ds = _load("RG3_UNCR.dcm")
    eight_bit = (ds.pixel_array >> 2).astype(np.uint8)  # 10 -> 8 bits stored
    ds.PixelData = eight_bit.tobytes()
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.WindowCenter, ds.WindowWidth = 137, 256
    source, target = tmp_path / "8bit.dcm", tmp_path / "baseline.dcm"
    ds.save_as(source, enforce_file_format=True)
    subprocess.run(["dcmcjpeg", "+eb", str(source), str(target)], check=True, timeout=120)
    encoded = pydicom.dcmread(target)
    assert encoded.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert float(np.abs(read_pixels(encoded) - read_pixels(pydicom.dcmread(source))).mean()) < 0.02


def test_monochrome1_is_inverted_so_that_bone_is_bright() -> None:
    ds = _load("RG3_UNCR.dcm")
    for keyword in ("WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    raw = ds.pixel_array.astype(np.float64)
    mono1 = read_pixels(ds)
    flipped = copy.deepcopy(ds)
    flipped.PhotometricInterpretation = "MONOCHROME2"
    flipped.PixelData = (raw.max() + raw.min() - raw).astype(np.uint16).tobytes()
    mono2 = read_pixels(flipped)
    np.testing.assert_allclose(mono1, mono2, atol=1e-6)
    # in MONOCHROME1 high stored values are dark: they must come out dark
    assert np.corrcoef(raw.ravel()[::97], mono1.ravel()[::97])[0, 1] < -0.99


def test_monochrome2_with_inverse_presentation_lut_is_inverted() -> None:
    ds = _load("RG3_UNCR.dcm")
    plain = copy.deepcopy(ds)
    plain.PhotometricInterpretation = "MONOCHROME2"
    inverse = copy.deepcopy(plain)
    inverse.PresentationLUTShape = "INVERSE"
    np.testing.assert_allclose(read_pixels(inverse), 1.0 - read_pixels(plain), atol=1e-6)


def test_window_is_applied() -> None:
    ds = _load("RG3_UNCR.dcm")
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = 300, 101
    pixels = read_pixels(ds)
    raw = ds.pixel_array
    assert np.all(pixels[raw <= 249] == 0.0)
    assert np.all(pixels[raw > 350] == 1.0)
    inside = (raw > 260) & (raw < 340)
    np.testing.assert_allclose(pixels[inside], (raw[inside] - 249.5) / 100.0, atol=1e-5)


def test_sigmoid_and_linear_exact_windows() -> None:
    ds = _load("RG3_UNCR.dcm")
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = 500, 200
    ds.VOILUTFunction = "LINEAR_EXACT"
    exact = read_pixels(ds)
    raw = ds.pixel_array.astype(np.float64)
    np.testing.assert_allclose(exact, np.clip((raw - 400) / 200, 0, 1), atol=1e-5)
    ds.VOILUTFunction = "SIGMOID"
    sigmoid = read_pixels(ds)
    np.testing.assert_allclose(sigmoid, 1 / (1 + np.exp(-4 * (raw - 500) / 200)), atol=1e-5)


def test_rescale_then_window() -> None:
    ds = _load("RG3_UNCR.dcm")
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.WindowCenter, ds.WindowWidth = 900.5, 1001  # covers rescaled 400..1400 linearly
    raw = ds.pixel_array.astype(np.float64)
    expected = np.clip((raw * 2 - 100 - 400) / 1000, 0, 1)
    np.testing.assert_allclose(read_pixels(ds), expected, atol=1e-5)


def test_voi_lut_sequence_wins_over_the_window() -> None:
    ds = _load("RG3_UNCR.dcm")
    ds.PhotometricInterpretation = "MONOCHROME2"
    lut = Dataset()
    lut.LUTDescriptor = [1024, 0, 12]  # 1024 entries, first input 0, 12-bit output
    table = (np.sqrt(np.arange(1024) / 1023) * 4095).astype(np.uint16)
    lut.LUTData = table.tolist()
    ds.VOILUTSequence = [lut]
    raw = ds.pixel_array
    np.testing.assert_allclose(read_pixels(ds), table[raw] / 4095.0, atol=1e-6)


def test_no_voi_uses_the_value_range() -> None:
    ds = _load("RG3_UNCR.dcm")
    ds.PhotometricInterpretation = "MONOCHROME2"
    del ds.WindowCenter
    del ds.WindowWidth
    pixels = read_pixels(ds)
    assert float(pixels.min()) == 0.0
    assert float(pixels.max()) == 1.0


def test_multi_valued_window_uses_the_first() -> None:
    ds = _load("RG3_UNCR.dcm")
    single = read_pixels(ds)
    ds.WindowCenter, ds.WindowWidth = [550, 100], [1024, 50]
    np.testing.assert_array_equal(read_pixels(ds), single)


def test_missing_pixel_data_is_unreadable() -> None:
    ds = _load("RG3_UNCR.dcm")
    del ds.PixelData
    with pytest.raises(UnreadableInstance, match="no pixel data"):
        read_pixels(ds)


def test_colour_is_refused() -> None:
    ds = _load("RG3_UNCR.dcm")
    ds.PhotometricInterpretation = "RGB"
    with pytest.raises(UnreadableInstance, match="not greyscale"):
        read_pixels(ds)


def test_corrupt_compressed_data_is_unreadable() -> None:
    ds = _load("RG3_J2KR.dcm")
    ds.PixelData = encapsulate([b"\x00" * 4096])
    with pytest.raises(UnreadableInstance, match="cannot decode"):
        read_pixels(ds)


def test_truncated_native_data_is_unreadable() -> None:
    ds = _load("RG3_UNCR.dcm")
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(UnreadableInstance):
        read_pixels(ds)


def test_zero_window_width_is_unreadable_not_a_crash() -> None:
    ds = _load("RG3_UNCR.dcm")
    ds.WindowWidth = 0
    with pytest.raises(UnreadableInstance, match="window width"):
        read_pixels(ds)


def test_laterality() -> None:
    assert laterality(_load("RG3_UNCR.dcm")) == "R"
    assert laterality(_load("RG1_UNCR.dcm")) is None
    ds = Dataset()
    ds.Laterality = "L "
    assert laterality(ds) == "L"
