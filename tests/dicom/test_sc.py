"""The Grad-CAM Secondary Capture from real radiographs: valid, legible, honest about itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from boneflow import NOT_FOR_DIAGNOSTIC_USE, __version__
from boneflow.dicom.pixels import read_pixels
from boneflow.dicom.results import to_bytes
from boneflow.dicom.sc import (
    MAX_SIDE_PIXELS,
    MIN_SIDE_PIXELS,
    MIN_WIDTH_PIXELS,
    build_secondary_capture,
    legend_lines,
    render_overlay,
)
from boneflow.findings import BoundingBox, Finding, FindingStatus
from tests.dicom.results_data import (
    analysed_finding,
    dciodvfy,
    not_analysed_finding,
    radiograph,
    strict_read,
)


def build(source: Dataset, **finding_args: object) -> Dataset:
    finding = analysed_finding(source, **finding_args)  # type: ignore[arg-type]
    return build_secondary_capture(
        source,
        finding,
        read_pixels(source),
        series_instance_uid=generate_uid(),
        series_number=9902,
        instance_number=1,
        series_description="boneflow test Grad-CAM wrist-fracture@2.1.0",
    )


@pytest.mark.parametrize("name", ["RG3_UNCR.dcm", "RG1_J2KI.dcm"])
def test_sc_is_valid_dicom_of_the_same_study(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = radiograph(name)
    data = to_bytes(build(source))

    errors, _warnings = dciodvfy(data, tmp_path)
    assert errors == []
    sc = strict_read(data, monkeypatch)
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.PatientID == source.PatientID
    assert sc.PatientName == source.PatientName
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.BurnedInAnnotation == "YES"
    assert sc.ImageType == ["DERIVED", "SECONDARY"]
    assert sc.SoftwareVersions == __version__
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsStored) == ("RGB", 3, 8)
    assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)
    if name.endswith("J2KI.dcm"):  # derived from a lossy image: says so
        assert sc.LossyImageCompression == "01"


def test_sc_keeps_aspect_and_caps_the_long_side() -> None:
    source = radiograph("RG1_UNCR.dcm")  # 1955 x 1841, not square
    finding = analysed_finding(source)
    rgb = render_overlay(read_pixels(source), finding)

    width = rgb.shape[1]
    image_rows = round(int(source.Rows) * width / int(source.Columns))
    assert max(width, image_rows) == MAX_SIDE_PIXELS
    assert width == round(int(source.Columns) * MAX_SIDE_PIXELS / int(source.Rows))
    assert rgb.shape[0] > image_rows  # the legend band lies below the radiograph


def test_heat_map_colours_the_hot_spot_and_leaves_the_rest_grey() -> None:
    source = radiograph("RG3_UNCR.dcm")
    rows, cols = int(source.Rows), int(source.Columns)
    finding = analysed_finding(source, centre=(rows // 4, cols // 4))
    rgb = render_overlay(read_pixels(source), finding).astype(np.int16)
    scale = MAX_SIDE_PIXELS / max(rows, cols)

    def chroma(row: int, col: int) -> int:
        r, g, b = rgb[int(row * scale), int(col * scale)]
        return int(max(r, g, b) - min(r, g, b))

    assert chroma(rows // 4, cols // 4) > 60  # the peak is coloured (red end of the map)
    assert chroma(3 * rows // 4, 3 * cols // 4) <= 2  # far away: still the grey radiograph


def test_legend_names_version_decision_and_disclaimer() -> None:
    source = radiograph("RG3_UNCR.dcm")
    lines = legend_lines(analysed_finding(source, probability=0.83, threshold=0.5))
    text = "\n".join(lines)
    assert __version__ in text and NOT_FOR_DIAGNOSTIC_USE in text
    assert "wrist (R)" in text
    assert "0.83" in text and "0.50" in text and "FRACTURE SUSPECTED" in text
    negative = "\n".join(legend_lines(analysed_finding(source, probability=0.1, present=False)))
    assert "no fracture detected" in negative


def test_burned_in_legend_changes_the_band_pixels() -> None:
    source = radiograph("RG3_UNCR.dcm")
    pixels = read_pixels(source)
    positive = render_overlay(pixels, analysed_finding(source, probability=0.9))
    negative = render_overlay(pixels, analysed_finding(source, probability=0.1, present=False))
    band_rows = slice(MAX_SIDE_PIXELS, None)
    assert positive.shape == negative.shape
    assert positive[band_rows].any()  # text drawn
    assert not np.array_equal(positive[band_rows], negative[band_rows])


def test_not_analysed_image_gets_no_sc() -> None:
    source = radiograph("RG1_UNCR.dcm")
    finding = not_analysed_finding(source)
    assert finding.status is FindingStatus.NOT_ANALYSED
    with pytest.raises(ValueError, match="not analysed"):
        build_secondary_capture(
            source,
            finding,
            read_pixels(source),
            series_instance_uid=generate_uid(),
            series_number=1,
            instance_number=1,
            series_description="x",
        )


@pytest.mark.parametrize(("rows", "cols"), [(64, 48), (3000, 500)])
def test_small_and_narrow_images_keep_aspect_and_a_legible_legend(rows: int, cols: int) -> None:
    source = radiograph("RG3_UNCR.dcm")
    finding = analysed_finding(source)
    assert finding.heatmap is not None and finding.hotspot is not None
    gradient = np.linspace(0.0, 1.0, rows * cols, dtype=np.float32).reshape(rows, cols)
    heat = np.zeros((rows, cols), dtype=np.float32)
    heat[rows // 3 : rows // 2, cols // 3 : cols // 2] = 1.0
    small = Finding(
        **{
            **{name: getattr(finding, name) for name in Finding.__dataclass_fields__},
            "heatmap": heat,
            "hotspot": BoundingBox(rows // 3, cols // 3, rows // 2, cols // 2),
        }
    )
    rgb = render_overlay(gradient, small)
    long_side = min(MAX_SIDE_PIXELS, max(MIN_SIDE_PIXELS, rows, cols))
    image_rows = round(rows * long_side / max(rows, cols))
    image_cols = round(cols * long_side / max(rows, cols))
    assert rgb.shape[1] == max(MIN_WIDTH_PIXELS, image_cols)
    assert rgb.shape[0] > image_rows
    left = (rgb.shape[1] - image_cols) // 2
    assert not rgb[:image_rows, :left].any()  # padding is black, the image is not stretched
    assert rgb[:image_rows, left : left + image_cols].any()
