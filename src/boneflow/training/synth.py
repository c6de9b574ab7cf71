"""Synthetic radiographs with labels, deterministic by seed (``boneflow synth``).

:func:`generate_image` draws one radiograph of a body part, with or without a fracture,
from a numpy ``Generator``; :func:`to_display` turns it into a float image with bone
bright for a trainer that skips files; :func:`synth_command` writes a data set (16-bit
PNG or DICOM CR/DX) with ``labels.csv``. Anatomy lives in ``synth_anatomy``, drawing in
``synth_raster``, fractures in ``synth_fracture`` and DICOM in ``synth_dicom``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import cv2
import numpy as np
import numpy.typing as npt

from boneflow.findings import BODY_PARTS
from boneflow.training.synth_anatomy import FRACTURE_BONES, Anatomy, build_anatomy, place
from boneflow.training.synth_fracture import (
    DIFFICULTIES,
    FRACTURE_TYPES,
    MIN_VISIBILITY,
    PlacedFracture,
    distractors,
    place_fracture,
)
from boneflow.training.synth_raster import Canvas, Lucency, draw_bone, draw_tissue

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger(__name__)

# Changes when the same seed draws different images (part of the demo's data fingerprint):
# 2 (2026-12-06): fractures re-placed where they would not show (MIN_VISIBILITY).
SYNTH_VERSION = 2

LABEL_COLUMNS: tuple[str, ...] = (
    "file",
    "body_part",
    "fractured",
    "fracture_type",
    "difficulty",
    "patient_id",
    "study_instance_uid",
    "laterality",
    "view",
    "fracture_x0",
    "fracture_y0",
    "fracture_x1",
    "fracture_y1",
    "photometric",
    "bits_stored",
)

VIEWS: dict[str, tuple[str, ...]] = {
    "hand": ("PA", "LAT", "OBL"),
    "wrist": ("PA", "LAT", "OBL"),
    "forearm": ("AP", "LAT"),
    "elbow": ("AP", "LAT"),
    "humerus": ("AP", "LAT"),
    "shoulder": ("AP",),
    "lower_leg": ("AP", "LAT"),
    "other": ("PA", "AP"),
}

# Fracture visibility (see fracture_visibility): attempts at a site, the window around the
# line (pixels at 512) and the mid-range exposure the clutter is judged at.
_PLACEMENTS = 8
_VISIBILITY_WINDOW = 16
_MU_BONE = 14.0
_NOISE = 0.018


@dataclass(frozen=True, slots=True)
class SynthSpec:
    """How images are drawn (the defaults are what ``boneflow synth`` uses).

    ``difficulty_weights`` are the shares of easy, moderate and hard fractures;
    ``young_rate`` the share of children (open growth plates); ``bits_stored`` the choices
    of stored bit depth.
    """

    fracture_types: tuple[str, ...] = FRACTURE_TYPES
    difficulty_weights: tuple[float, float, float] = (0.3, 0.35, 0.35)
    young_rate: float = 0.3
    monochrome1_rate: float = 0.4
    bits_stored: tuple[int, ...] = (8, 10, 12, 14, 16)
    pelvis_rate: float = 0.35  # share of "other" images that are pelvis instead of chest


@dataclass(frozen=True)
class SynthImage:
    """One synthetic radiograph as stored values, with its ground truth."""

    pixels: npt.NDArray[np.uint16]  # stored values, rows x columns
    bits_stored: int
    photometric: str  # "MONOCHROME1" (bone dark) or "MONOCHROME2" (bone bright)
    body_part: str
    fractured: bool
    fracture_type: str  # "" for negatives
    difficulty: str  # easy, moderate, hard or "none"
    fracture_segment: tuple[float, float, float, float] | None  # x0, y0, x1, y1 pixels
    laterality: str  # "L", "R" or "" (unpaired)
    view: str  # PA, AP, LAT, OBL
    # contrast over clutter of the drawn fracture (fracture_visibility); 0 for negatives
    visibility: float = 0.0
    # training-only ground truth per pixel (synth_raster.ANATOMY_CLASSES: no bone, one bone,
    # overlapping bones, a growth plate or canal), 0 outside the collimator; not stored
    anatomy: npt.NDArray[np.uint8] | None = field(default=None, repr=False, compare=False)


def generate_image(
    rng: np.random.Generator,
    body_part: str,
    fractured: bool,
    size: int = 512,
    *,
    spec: SynthSpec | None = None,
    fracture_type: str | None = None,
    difficulty: str | None = None,
    laterality: str | None = None,
    view: str | None = None,
) -> SynthImage:
    """Draw one radiograph; ``size`` is the number of rows (the long side).

    ``fracture_type``, ``difficulty``, ``laterality`` and ``view`` are drawn from ``rng``
    unless given (the same number of values is drawn either way).

    Raises:
        ValueError: an unknown body part, fracture type or difficulty, or size < 64.
    """
    image, _ = render(
        rng,
        body_part,
        fractured,
        size,
        spec=spec,
        fracture_type=fracture_type,
        difficulty=difficulty,
        laterality=laterality,
        view=view,
    )
    return image


def to_display(image: SynthImage) -> npt.NDArray[np.float32]:
    """Float32 image in 0..1 with bone bright (MONOCHROME1 inverted), full range."""
    values = image.pixels.astype(np.float32)
    lo, hi = float(values.min()), float(values.max())
    scaled = (values - lo) / max(hi - lo, 1.0)
    if image.photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return scaled.astype(np.float32)


def synth_command(
    out_dir: Path,
    count: int,
    seed: int,
    fmt: str,
    size: int,
    fracture_rate: float,
    parts: list[str] | None,
) -> int:
    """``boneflow synth``: write ``count`` images and ``labels.csv`` under ``out_dir``.

    Returns:
        The exit status (0).

    Raises:
        BoneflowError: a bad argument (named in the message).
    """
    from boneflow.training.synth_dataset import write_dataset

    return write_dataset(out_dir, count, seed, fmt, size, fracture_rate, parts)


def render(
    rng: np.random.Generator,
    body_part: str,
    fractured: bool,
    size: int = 512,
    *,
    spec: SynthSpec | None = None,
    fracture_type: str | None = None,
    difficulty: str | None = None,
    laterality: str | None = None,
    view: str | None = None,
) -> tuple[SynthImage, npt.NDArray[np.float32]]:
    """:func:`generate_image` plus the bone attenuation map (for tests and debugging)."""
    spec = spec or SynthSpec()
    _check(body_part, size, fracture_type, difficulty)
    drawn_view = VIEWS[body_part][int(rng.integers(len(VIEWS[body_part])))]
    drawn_side = "" if body_part == "other" else ("L" if rng.random() < 0.5 else "R")
    view = view if view is not None else drawn_view
    laterality = laterality if laterality is not None else drawn_side
    young = bool(rng.random() < spec.young_rate) and body_part != "other"
    variant = "pelvis" if rng.random() < spec.pelvis_rate else "chest"
    height = size
    width = round(size * float(rng.choice([0.8, 0.85, 1.0])))
    anatomy = place(
        build_anatomy(rng, body_part, view, young, variant),
        height,
        width,
        rng,
        mirror=laterality == "L",
    )
    scale = height / 512.0
    texture = _texture(rng, height, width)
    lucencies = tuple(distractors(rng, bone, young, scale) for bone in anatomy.bones)
    base = Canvas(height, width, anatomy.px_per_unit)
    for bone, lines in zip(anatomy.bones, lucencies, strict=True):
        draw_bone(base, bone, texture, None, lines)
    bone_map = base.bone
    placed: PlacedFracture | None = None
    kind, tier, visibility = "", "none", 0.0
    if fractured:
        drawn_kind = str(rng.choice(list(spec.fracture_types)))
        weights = np.asarray(spec.difficulty_weights) / sum(spec.difficulty_weights)
        drawn_tier = str(DIFFICULTIES[int(rng.choice(3, p=weights))])
        kind = fracture_type or drawn_kind
        tier = difficulty or drawn_tier
        allowed = FRACTURE_BONES[body_part]
        placed, delta, visibility = _visible_fracture(
            rng, anatomy, base, texture, lucencies, kind, tier, allowed
        )
        bone_map = bone_map + delta
    if anatomy.plates:
        bone_map = bone_map + _plates(anatomy, height, width, texture)
    values, exposed = _expose(rng, anatomy, height, width, bone_map, placed)
    markers = _markers(rng, values, laterality, view, placed)
    pixels, bits, photometric = _quantise(rng, markers, spec)
    image = SynthImage(
        pixels=pixels,
        bits_stored=bits,
        photometric=photometric,
        body_part=body_part,
        fractured=fractured,
        fracture_type=kind,
        difficulty=tier,
        fracture_segment=tuple(round(v, 1) for v in placed.segment) if placed else None,  # type: ignore[arg-type]
        laterality=laterality,
        view=view,
        visibility=round(visibility, 2),
        anatomy=np.where(exposed, base.anatomy(), 0).astype(np.uint8),
    )
    return image, bone_map.astype(np.float32)


def fracture_visibility(
    bone_map: npt.NDArray[np.float32],
    change: npt.NDArray[np.float32],
    segment: tuple[float, float, float, float],
    scale: float,
) -> float:
    """How well a drawn fracture stands out from what surrounds it (a contrast-to-clutter ratio).

    ``bone_map`` is the intact bone attenuation, ``change`` what the fracture adds to it
    (negative in the gap, either sign where fragments moved). The signal is the mean of
    the strongest changes, one pixel per pixel of line length, after the strongest blur an
    image may get; the clutter is the fine structure of the bone around the line
    (trabecular texture, overlapping bones, canals) plus the quantum noise that dense bone
    lets through, at a mid-range exposure. Both in units of the log image.
    """
    height, width = bone_map.shape
    x0, y0, x1, y1 = segment
    reach = round(_VISIBILITY_WINDOW * scale)
    ya, yb = max(int(min(y0, y1)) - reach, 0), min(int(max(y0, y1)) + reach + 1, height)
    xa, xb = max(int(min(x0, x1)) - reach, 0), min(int(max(x0, x1)) + reach + 1, width)
    if ya >= yb or xa >= xb:  # the line lies outside the image
        return 0.0
    bone = bone_map[ya:yb, xa:xb]
    moved = np.abs(cv2.GaussianBlur(change[ya:yb, xa:xb], (0, 0), 0.9 * scale))
    count = min(max(int(math.hypot(x1 - x0, y1 - y0)), 4), moved.size)
    signal = float(np.partition(moved.ravel(), moved.size - count)[-count:].mean())
    fine = bone - cv2.GaussianBlur(bone, (0, 0), 2.0 * scale)
    on_bone = bone > 0.2 * float(bone.max())
    if not on_bone.any():
        return 0.0
    clutter = float(fine[on_bone].std())
    attenuation = _MU_BONE * float(np.median(bone[on_bone]))
    noise = _NOISE * math.exp(min(attenuation / 2, math.log(1 / math.sqrt(0.02))))
    return _MU_BONE * signal / math.hypot(_MU_BONE * clutter, noise)


def _visible_fracture(
    rng: np.random.Generator,
    anatomy: Anatomy,
    base: Canvas,
    texture: npt.NDArray[np.float32],
    lucencies: tuple[tuple[Lucency, ...], ...],
    kind: str,
    tier: str,
    allowed: tuple[str, ...],
) -> tuple[PlacedFracture, npt.NDArray[np.float32], float]:
    """Place a fracture where it shows as its tier promises: it, its change, its visibility.

    A site is drawn again (up to ``_PLACEMENTS`` times) while the fracture's visibility is
    below its tier's floor (a line lost in the dense trabecular end of a bone, under an
    overlapping bone); the most visible of the attempts is kept if none reaches it.
    """
    height, width = base.height, base.width
    scale = height / 512.0
    best: tuple[float, PlacedFracture, npt.NDArray[np.float32]] | None = None
    intact: dict[int, npt.NDArray[np.float32]] = {}  # each bone alone, unbroken
    for _ in range(_PLACEMENTS):
        placed = place_fracture(rng, anatomy.bones, height, width, kind, tier, allowed)
        if placed is None:  # pragma: no cover - every view shows a fracturable bone
            raise ValueError("no visible bone to fracture in this view")
        index = placed.bone_index
        bone, lines = anatomy.bones[index], lucencies[index]
        if index not in intact:
            alone = Canvas(height, width, anatomy.px_per_unit)
            draw_bone(alone, bone, texture, None, lines)
            intact[index] = alone.bone
        broken = Canvas(height, width, anatomy.px_per_unit)
        draw_bone(broken, bone, texture, placed.fracture, lines)
        change = broken.bone - intact[index]
        visibility = fracture_visibility(base.bone, change, placed.segment, scale)
        if best is None or visibility > best[0]:
            best = (visibility, placed, change)
        if visibility >= MIN_VISIBILITY[tier]:
            break
    assert best is not None
    return best[1], best[2], best[0]


def _check(body_part: str, size: int, fracture_type: str | None, difficulty: str | None) -> None:
    if body_part not in BODY_PARTS:
        raise ValueError(f"unknown body part {body_part!r} (known: {', '.join(BODY_PARTS)})")
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, not {size}")
    if fracture_type is not None and fracture_type not in FRACTURE_TYPES:
        raise ValueError(f"unknown fracture type {fracture_type!r}")
    if difficulty is not None and difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}")


def _texture(rng: np.random.Generator, height: int, width: int) -> npt.NDArray[np.float32]:
    """Trabecular texture: band-passed noise around 1."""
    small = rng.standard_normal((height // 2 + 1, width // 2 + 1), dtype=np.float32)
    band = cv2.GaussianBlur(small, (0, 0), 0.7) - cv2.GaussianBlur(small, (0, 0), 2.0)
    band = np.asarray(cv2.resize(band, (width, height), interpolation=cv2.INTER_LINEAR), np.float32)
    band *= np.float32(1.0 / (float(band.std()) + 1e-6))
    texture: npt.NDArray[np.float32] = np.clip(1 + 0.3 * band, 0.4, 1.7).astype(np.float32)
    return texture


def _expose(
    rng: np.random.Generator,
    anatomy: Anatomy,
    height: int,
    width: int,
    bone_map: npt.NDArray[np.float32],
    placed: PlacedFracture | None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Attenuation maps to a processed, noisy image in 0..1 (bone bright), and where the
    collimator let it be exposed."""
    canvas = Canvas(height, width, anatomy.px_per_unit)
    scale = height / 512.0
    for t in anatomy.tissues:
        draw_tissue(canvas, t.x0, t.y0, t.x1, t.y1, t.radius, t.density)
    soft = canvas.soft
    if anatomy.blobs:
        soft = soft + _blobs(anatomy, height, width)
    mu_bone = 14.0 * float(rng.uniform(0.8, 1.2))
    mu_soft = 1.6 * float(rng.uniform(0.7, 1.3))
    attenuation = mu_soft * soft + mu_bone * bone_map
    blur = float(rng.uniform(0.35, 0.9)) * scale
    attenuation = cv2.GaussianBlur(attenuation, (0, 0), blur)
    heel = _gradient(rng, height, width, float(rng.uniform(0.0, 0.25)))
    transmitted = np.exp(-attenuation) * heel
    k = float(rng.uniform(0.006, 0.03))
    noise = rng.standard_normal((height, width), dtype=np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), 0.6 * scale) * np.float32(1.6)
    log_image = (
        -np.log(np.maximum(transmitted, 1e-4))
        + np.float32(k) * noise / np.sqrt(np.maximum(transmitted, 0.02))
    ).astype(np.float32)
    if rng.random() < 0.5:  # unsharp masking, as CR readers do
        low = _smooth(log_image, 10 * scale)
        log_image = log_image + float(rng.uniform(0.3, 1.0)) * (log_image - low)
    lo, hi = np.percentile(log_image[::4, ::4], (0.5, 99.7))
    values = np.clip((log_image - lo) / max(hi - lo, 1e-3), 0, 1)
    values = np.power(values, float(rng.uniform(0.75, 1.3)))
    return _collimate(rng, values.astype(np.float32), placed)


def _blobs(anatomy: Anatomy, height: int, width: int) -> npt.NDArray[np.float32]:
    layer = np.zeros((height, width), np.float32)
    for b in anatomy.blobs:
        one = np.zeros((height, width), np.float32)
        cv2.ellipse(
            one,
            (int(b.cx), int(b.cy)),
            (max(int(b.ax), 1), max(int(b.ay), 1)),
            b.angle_deg,
            0,
            360,
            1.0,
            -1,
            cv2.LINE_AA,
        )
        sigma = max(b.ax, b.ay) * 0.15
        layer += _smooth(one, sigma) * np.float32(b.density * 0.35)
    return layer


def _plates(
    anatomy: Anatomy, height: int, width: int, texture: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    layer = np.zeros((height, width), np.float32)
    for p in anatomy.plates:
        pts = np.round(np.asarray(p.points)).astype(np.int32).reshape(-1, 1, 2)
        one = np.zeros((height, width), np.float32)
        cv2.fillPoly(one, [pts], 1.0, cv2.LINE_AA)
        rim = max(int(p.rim), 1)
        cv2.polylines(one, [pts], True, 2.0, rim, cv2.LINE_AA)
        one = np.asarray(cv2.GaussianBlur(one, (0, 0), max(rim * 0.5, 0.8)), np.float32)
        layer += one * np.float32(p.density * 0.04) * texture
    return layer


def _smooth(image: npt.NDArray[np.float32], sigma: float) -> npt.NDArray[np.float32]:
    """A wide Gaussian blur, computed at reduced resolution (wide kernels are slow)."""
    factor = max(int(sigma / 2.0), 1)
    if factor == 1:
        return np.asarray(cv2.GaussianBlur(image, (0, 0), sigma), np.float32)
    height, width = image.shape
    small = cv2.resize(image, (width // factor, height // factor), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / factor)
    return np.asarray(
        cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR), np.float32
    )


def _gradient(
    rng: np.random.Generator, height: int, width: int, strength: float
) -> npt.NDArray[np.float32]:
    angle = float(rng.uniform(0, 2 * math.pi))
    ys = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]
    xs = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
    ramp = math.cos(angle) * xs + math.sin(angle) * ys
    return (1 + strength * ramp).astype(np.float32)


def _collimate(
    rng: np.random.Generator, values: npt.NDArray[np.float32], placed: PlacedFracture | None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Blank the area outside the collimator (unexposed: bright; or shuttered: black).

    Returns the image and where it is exposed (inside the collimator).
    """
    if rng.random() < 0.3:
        return values, np.ones(values.shape, np.bool_)
    height, width = values.shape
    margins = rng.uniform(0.0, 0.1, 4)
    x0, x1 = margins[0] * width, width * (1 - margins[1])
    y0, y1 = margins[2] * height, height * (1 - margins[3])
    if placed is not None:  # the collimator never hides the fracture
        sx0, sy0, sx1, sy1 = placed.segment
        x0, x1 = min(x0, sx0 - 8, sx1 - 8), max(x1, sx0 + 8, sx1 + 8)
        y0, y1 = min(y0, sy0 - 8, sy1 - 8), max(y1, sy0 + 8, sy1 + 8)
    mask = np.zeros((height, width), np.float32)
    cv2.rectangle(mask, (int(x0), int(y0)), (int(x1), int(y1)), 1.0, -1)
    mask = np.asarray(cv2.GaussianBlur(mask, (0, 0), 1.0), np.float32)
    outside = float(rng.uniform(0.85, 1.0)) if rng.random() < 0.6 else float(rng.uniform(0, 0.05))
    return (values * mask + outside * (1 - mask)).astype(np.float32), mask > 0.5


def _markers(
    rng: np.random.Generator,
    values: npt.NDArray[np.float32],
    laterality: str,
    view: str,
    placed: PlacedFracture | None,
) -> npt.NDArray[np.float32]:
    """Lead side marker and burned-in text, in the corners away from the fracture."""
    height, width = values.shape
    out = values.copy()
    corners = [(0.06, 0.1), (0.78, 0.1), (0.06, 0.95), (0.78, 0.95)]
    if placed is not None:
        mx = (placed.segment[0] + placed.segment[2]) / 2 / width
        my = (placed.segment[1] + placed.segment[3]) / 2 / height
        corners.sort(key=lambda c: -((c[0] + 0.08 - mx) ** 2 + (c[1] - 0.04 - my) ** 2))
    else:
        order = rng.permutation(4)
        corners = [corners[i] for i in order]
    scale = height / 512.0
    if laterality:
        fx, fy = corners[0]
        level = float(rng.uniform(0.9, 1.0))
        _burn(
            out,
            laterality,
            (int(fx * width), int(fy * height)),
            cv2.FONT_HERSHEY_SIMPLEX,
            1.3 * scale,
            level,
            max(int(3 * scale), 1),
        )
    if rng.random() < 0.5:
        fx, fy = corners[1]
        text = f"SYNTH {view}" if rng.random() < 0.5 else f"{int(rng.integers(1, 99)):02d}"
        _burn(
            out,
            text,
            (int(fx * width * 0.9), int(fy * height)),
            cv2.FONT_HERSHEY_PLAIN,
            1.0 * scale,
            float(rng.uniform(0.8, 1.0)),
            max(int(scale), 1),
        )
    return out


def _burn(
    out: npt.NDArray[np.float32],
    text: str,
    origin: tuple[int, int],
    font: int,
    font_scale: float,
    level: float,
    thickness: int,
) -> None:
    """Burn text in at ``level`` (OpenCV draws text on 8-bit images only)."""
    mask = np.zeros(out.shape, np.uint8)
    cv2.putText(mask, text, origin, font, font_scale, 255, thickness, cv2.LINE_AA)
    np.maximum(out, mask.astype(np.float32) * np.float32(level / 255.0), out=out)


def _quantise(
    rng: np.random.Generator, values: npt.NDArray[np.float32], spec: SynthSpec
) -> tuple[npt.NDArray[np.uint16], int, str]:
    bits = int(rng.choice(list(spec.bits_stored)))
    top = (1 << bits) - 1
    lo = float(rng.uniform(0.0, 0.08)) * top
    hi = float(rng.uniform(0.85, 1.0)) * top
    stored = lo + np.clip(values, 0, 1) * (hi - lo)
    photometric = "MONOCHROME1" if rng.random() < spec.monochrome1_rate else "MONOCHROME2"
    if photometric == "MONOCHROME1":
        stored = top - stored
    return np.clip(np.rint(stored), 0, top).astype(np.uint16), bits, photometric
