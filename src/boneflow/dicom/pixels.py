"""Decode a radiograph and make it display-ready: modality LUT, VOI LUT or window, MONOCHROME1.

The result of :func:`read_pixels` is a float32 ``rows x columns`` array in ``[0, 1]`` in which
bone is bright, whatever the transfer syntax (pydicom decodes with GDCM, pylibjpeg or
Pillow, whichever is installed and first able), photometric interpretation or LUTs.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi
from pydicom.pixels.utils import pixel_array

from boneflow.errors import UnreadableInstance

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
_GREYSCALE = ("MONOCHROME1", "MONOCHROME2")


def read_pixels(ds: Dataset) -> FloatArray:
    """Decode the first frame and apply modality LUT, VOI LUT/window and MONOCHROME1 inversion.

    The VOI stage uses the VOI LUT Sequence when present, otherwise the first Window
    Center/Width (LINEAR, LINEAR_EXACT or SIGMOID); with neither, the image's own value range.
    MONOCHROME1 (and MONOCHROME2 with Presentation LUT Shape INVERSE) is inverted last.

    Returns:
        float32 array (rows x columns), values in ``[0, 1]``, bone bright.

    Raises:
        UnreadableInstance: no pixel data, not greyscale, or the pixel data cannot be decoded.
    """
    uid = str(ds.get("SOPInstanceUID", "<no SOP Instance UID>"))
    if "PixelData" not in ds:
        raise UnreadableInstance(f"{uid}: no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _GREYSCALE:
        raise UnreadableInstance(
            f"{uid}: photometric interpretation {photometric!r} is not greyscale"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        raw = pixel_array(ds, index=0 if frames > 1 else None)
    except Exception as exc:  # decoder plugins raise many kinds; all mean "cannot decode"
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise UnreadableInstance(f"{uid}: cannot decode pixel data ({syntax}): {exc}") from exc
    if frames > 1:
        log.warning("%s: %d frames, analysing the first", uid, frames)
    if raw.ndim != 2 or raw.size == 0:
        raise UnreadableInstance(f"{uid}: expected one greyscale frame, got shape {raw.shape}")
    try:
        display = _to_display(raw, ds)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise UnreadableInstance(f"{uid}: invalid LUT or window attributes: {exc}") from exc
    if _inverted(ds, photometric):
        display = np.subtract(np.float32(1.0), display, out=display)
    return display


def laterality(ds: Dataset) -> str | None:
    """``"L"`` or ``"R"`` from Image Laterality (or Laterality), else None."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return value
    return None


# --- helpers -----------------------------------------------------------------------------------


def _to_display(raw: npt.NDArray[np.generic], ds: Dataset) -> FloatArray:
    """Modality LUT then VOI, scaled to 0..1 (not yet inverted)."""
    if "ModalityLUTSequence" in ds:
        values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    else:
        values = raw.astype(np.float32)
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        if slope != 1.0 or intercept != 0.0:
            values = values * np.float32(slope) + np.float32(intercept)

    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        # apply_voi indexes the LUT with the (integer) modality output.
        lut_out = apply_voi(np.rint(values).astype(np.int64), ds)
        return _scaled(np.asarray(lut_out, dtype=np.float32), 0.0, float(2**bits - 1))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return _window(values, ds)
    low, high = float(values.min()), float(values.max())
    return _scaled(values, low, high)


def _window(values: FloatArray, ds: Dataset) -> FloatArray:
    """PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT or SIGMOID window onto 0..1."""
    center = _first(ds.WindowCenter)
    width = _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"window width {width} must be > 0 for SIGMOID")
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - np.float32(center)) / np.float32(width)))
        return np.asarray(out, dtype=np.float32)
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"window width {width} must be > 0 for LINEAR_EXACT")
        low = center - width / 2
        span = width
    else:
        if function != "LINEAR":
            log.warning("unknown VOI LUT Function %r, using LINEAR", function)
        if width < 1:
            raise ValueError(f"window width {width} must be >= 1 for LINEAR")
        low = (center - 0.5) - (width - 1) / 2
        span = width - 1 if width > 1 else 1.0
    return _scaled(values, low, low + span)


def _scaled(values: FloatArray, low: float, high: float) -> FloatArray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    out = (values - np.float32(low)) * np.float32(1.0 / (high - low))
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def _first(value: object) -> float:
    """The first of a multi-valued DS (pydicom gives a list), as float."""
    if isinstance(value, MultiValue | list | tuple):
        return float(value[0])
    return float(str(value))


def _inverted(ds: Dataset, photometric: str) -> bool:
    if photometric == "MONOCHROME1":
        return True
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return shape == "INVERSE"


__all__ = ["laterality", "read_pixels"]
