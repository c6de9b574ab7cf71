"""The Grad-CAM Secondary Capture: the radiograph with the heat map and a burned-in legend."""

from __future__ import annotations

import logging

import cv2
import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from boneflow import NOT_FOR_DIAGNOSTIC_USE, PRODUCT_NAME, __version__
from boneflow.dicom.sr import names_copied_as_sent
from boneflow.findings import Finding, FindingStatus

log = logging.getLogger(__name__)

MAX_SIDE_PIXELS = 1024  # long side of the rendered radiograph; the legend band adds to it
MIN_SIDE_PIXELS = 512  # small images are enlarged to this long side, so the legend is legible
MIN_WIDTH_PIXELS = 512  # a narrow radiograph is centred on black, never stretched
MANUFACTURER = "boneflow project"
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_LOW_HEAT = 0.2  # heat below this is left transparent, so the bone stays readable
_MAX_ALPHA = 0.55
_WHITE = (255, 255, 255)
_RED = (255, 80, 80)
_YELLOW = (255, 220, 0)


def build_secondary_capture(
    source: Dataset,
    finding: Finding,
    pixels: npt.NDArray[np.float32],
    *,
    series_instance_uid: str,
    series_number: int,
    instance_number: int,
    series_description: str,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """Build one Secondary Capture of an analysed image.

    Args:
        source: the source radiograph (its identity, study and orientation are copied).
        finding: the analysed finding of that image (heat map in the source pixel grid).
        pixels: the display-ready source image (``boneflow.dicom.pixels.read_pixels``).
        series_instance_uid: the new series of boneflow's Secondary Captures.
        series_number: its series number.
        instance_number: this image's number within the series.
        series_description: names boneflow and the model versions (at most 64 characters).
        sop_instance_uid: a UID to use; a new one by default.

    Returns:
        A validated Secondary Capture Image Storage dataset (RGB, 8 bit, explicit VR LE).

    Raises:
        ValueError: the finding is not an analysed finding of ``source``.
    """
    if finding.status is not FindingStatus.ANALYSED:
        raise ValueError(f"image {finding.sop_instance_uid} was not analysed: no SC")
    if finding.sop_instance_uid != source.SOPInstanceUID:
        raise ValueError("the finding does not belong to the source image")
    rgb = render_overlay(pixels, finding)
    orientation = _orientation(source)
    with names_copied_as_sent():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid or generate_uid(),
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            patient_orientation=orientation or ("L", "F"),
            laterality=finding.laterality if finding.laterality in ("L", "R") else None,
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
    if orientation is None:  # unknown in the source: say so rather than invent one
        sc["PatientOrientation"].value = ""
    _describe(sc, source, finding, series_description, rgb.shape)
    log.debug("built SC %s of %s", sc.SOPInstanceUID, source.SOPInstanceUID)
    return sc


def render_overlay(
    pixels: npt.NDArray[np.float32], finding: Finding, max_side: int = MAX_SIDE_PIXELS
) -> npt.NDArray[np.uint8]:
    """Blend the heat map over the radiograph and add the legend band below it.

    The radiograph keeps its aspect ratio, its long side is capped at ``max_side`` (and
    raised to ``MIN_SIDE_PIXELS`` for small images), a narrow one is centred on black so
    the legend fits, and no text covers it: product, version, body part, probability,
    decision and the not-for-diagnostic-use notice go into a band underneath, with the
    colour scale.

    Returns:
        An RGB ``uint8`` array (rows, columns, 3).
    """
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {pixels.shape}")
    rows, cols = pixels.shape
    long_side = max(rows, cols)
    scale = min(max_side, max(long_side, MIN_SIDE_PIXELS)) / long_side
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))  # cv2: (width, height)
    # Resize first, clip after: the same picture for in-range input, on a third of the pixels.
    gray = _to_unit(_resized(pixels, size, cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR))
    image = np.asarray(
        cv2.cvtColor((gray * 255.0 + 0.5).astype(np.uint8), cv2.COLOR_GRAY2RGB), np.uint8
    )
    if finding.heatmap is not None:
        heat = _to_unit(_resized(finding.heatmap, size, cv2.INTER_LINEAR))
        alpha = np.clip((heat - _LOW_HEAT) * (_MAX_ALPHA / (1.0 - _LOW_HEAT)), 0.0, _MAX_ALPHA)
        # base + alpha * (colour - base), in place on one float32 copy
        blended = _colormap(heat).astype(np.float32)
        base = image.astype(np.float32)
        blended -= base
        blended *= alpha[:, :, None]
        blended += base
        blended += 0.5
        image = np.clip(blended, 0, 255).astype(np.uint8)
    picture = image
    if finding.hotspot is not None:
        box = finding.hotspot
        top_left = (int(box.col_min * scale), int(box.row_min * scale))
        bottom_right = (int(box.col_max * scale) - 1, int(box.row_max * scale) - 1)
        thickness = max(1, size[0] // 400)
        cv2.rectangle(picture, top_left, bottom_right, _YELLOW, thickness, cv2.LINE_AA)
    if size[0] < MIN_WIDTH_PIXELS:
        left = (MIN_WIDTH_PIXELS - size[0]) // 2
        padding = ((0, 0), (left, MIN_WIDTH_PIXELS - size[0] - left), (0, 0))
        picture = np.pad(picture, padding)
    width = picture.shape[1]
    return np.ascontiguousarray(np.vstack([picture, _legend_band(finding, width)]))


def legend_lines(finding: Finding) -> list[str]:
    """The burned-in text, line by line (ASCII only)."""
    side = f" ({finding.laterality})" if finding.laterality in ("L", "R") else ""
    lines = [f"{PRODUCT_NAME} {__version__} - {NOT_FOR_DIAGNOSTIC_USE}"]
    lines.append(f"Body part: {finding.body_part or 'unknown'}{side}")
    if finding.fracture_probability is not None:
        threshold = f" (threshold {finding.threshold:.2f})" if finding.threshold is not None else ""
        lines.append(
            f"Fracture probability {finding.fracture_probability:.2f}{threshold}: "
            + decision_text(finding)
        )
    else:
        lines.append("Fracture probability: not available")
    model = str(finding.fracture_model) if finding.fracture_model else "-"
    lines.append(f"Models: {model}, router {finding.router}")
    return [line.encode("ascii", "replace").decode("ascii") for line in lines]


def decision_text(finding: Finding) -> str:
    """The operating-point decision in words."""
    if finding.fracture_present is True:
        return "FRACTURE SUSPECTED"
    if finding.fracture_present is False:
        return "no fracture detected"
    return "indeterminate"


def _describe(
    sc: Dataset,
    source: Dataset,
    finding: Finding,
    series_description: str,
    shape: tuple[int, ...],
) -> None:
    # Names were decoded with the source's character set; UTF-8 can hold all of them.
    sc.SpecificCharacterSet = "ISO_IR 192"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.SeriesDescription = series_description[:64]
    sc.ManufacturerModelName = PRODUCT_NAME
    sc.SoftwareVersions = __version__
    sc.DerivationDescription = (
        f"Grad-CAM of {finding.fracture_model} blended over the source radiograph, "
        f"resized to {shape[1]}x{shape[0]} with a legend band; {NOT_FOR_DIAGNOSTIC_USE}"
    )[:1024]
    purpose = Dataset()
    code = codes.DCM.SourceImageForImageProcessingOperation
    purpose.CodeValue = code.value
    purpose.CodingSchemeDesignator = code.scheme_designator
    purpose.CodeMeaning = code.meaning
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [reference]
    if source.get("LossyImageCompression") == "01":  # lossy once, lossy forever
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                setattr(sc, keyword, source[keyword].value)


def _orientation(source: Dataset) -> tuple[str, str] | None:
    value = source.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    first, second = (str(v) for v in value)
    if not first or not second or any(c not in "LRAPHF" for c in first + second):
        return None
    return first, second


def _to_unit(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """A 2-D map clipped to 0..1 (``read_pixels`` already applied the window)."""
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {values.shape}")
    return np.clip(np.nan_to_num(values.astype(np.float32)), 0.0, 1.0).astype(np.float32)


def _resized(
    values: npt.NDArray[np.float32], size: tuple[int, int], interpolation: int
) -> npt.NDArray[np.float32]:
    values = np.asarray(values, dtype=np.float32)
    if (values.shape[1], values.shape[0]) == size:
        return values
    return np.asarray(cv2.resize(values, size, interpolation=interpolation), np.float32)


def _colormap(heat: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    bgr = cv2.applyColorMap((heat * 255.0 + 0.5).astype(np.uint8), cv2.COLORMAP_JET)
    return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)


def _legend_band(finding: Finding, width: int) -> npt.NDArray[np.uint8]:
    font_scale = max(0.35, width / 1700.0)
    thickness = max(1, round(font_scale * 1.6))
    (_, text_height), baseline = cv2.getTextSize("Ag", _FONT, font_scale, thickness)
    line_height = text_height + baseline + max(4, text_height // 2)
    lines = legend_lines(finding)
    margin = max(4, width // 100)
    height = margin * 2 + line_height * len(lines)
    band = np.zeros((height, width, 3), dtype=np.uint8)
    bar_width = max(16, width // 5)
    text_width = width - bar_width - 3 * margin
    for index, line in enumerate(lines):
        color = _WHITE
        if index == 0:
            color = _YELLOW
        elif index == 2 and finding.fracture_present:
            color = _RED
        y = margin + line_height * index + text_height
        cv2.putText(band, _fit(line, text_width, font_scale, thickness), (margin, y), _FONT,
                    font_scale, color, thickness, cv2.LINE_AA)  # fmt: skip
    _draw_colour_bar(band, width - bar_width - margin, margin, bar_width, font_scale, thickness)
    return band


def _draw_colour_bar(
    band: npt.NDArray[np.uint8], left: int, top: int, width: int, scale: float, thickness: int
) -> None:
    (_, text_height), baseline = cv2.getTextSize("Ag", _FONT, scale, thickness)
    cv2.putText(band, "Grad-CAM", (left, top + text_height), _FONT, scale, _WHITE, thickness,
                cv2.LINE_AA)  # fmt: skip
    bar_top = top + text_height + baseline + 2
    bar_height = max(6, text_height)
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :].repeat(bar_height, axis=0)
    band[bar_top : bar_top + bar_height, left : left + width] = _colormap(ramp)
    label_y = bar_top + bar_height + text_height + baseline
    if label_y >= band.shape[0]:
        return
    (high_width, _), _ = cv2.getTextSize("high", _FONT, scale, thickness)
    cv2.putText(band, "low", (left, label_y), _FONT, scale, _WHITE, thickness, cv2.LINE_AA)
    cv2.putText(band, "high", (left + width - high_width, label_y), _FONT, scale, _WHITE,
                thickness, cv2.LINE_AA)  # fmt: skip


def _fit(text: str, width: int, scale: float, thickness: int) -> str:
    while len(text) > 4 and cv2.getTextSize(text, _FONT, scale, thickness)[0][0] > width:
        text = text[:-4] + "..."
    return text
