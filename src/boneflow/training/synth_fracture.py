"""Fractures of graded difficulty and the distractors that are not fractures.

Sizes are in pixels of a 512-pixel image and scale with the image. The difficulty tiers
differ in how wide and deep the lucent line is, how much of the bone it crosses and how
far the fragments moved; "hard" is a thin, faint, incomplete line with no displacement.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from boneflow.training.synth_raster import Bone, BoneFracture, Buckle, Cut, Lucency, Motion

FRACTURE_TYPES: tuple[str, ...] = (
    "displaced",
    "non_displaced",
    "hairline",
    "oblique",
    "comminuted",
    "buckle",
)
DIFFICULTIES: tuple[str, ...] = ("easy", "moderate", "hard")

# Per tier: (gap px at 512, depth, share of the width crossed, displacement / radius).
# Sized so that easy and moderate lines survive down-sampling to 224 px and hard ones
# are at the edge of it.
_TIERS: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float], float]] = {
    "easy": ((3.0, 5.0), (0.9, 1.0), (1.0, 1.0), 1.0),
    "moderate": ((1.8, 3.0), (0.7, 0.9), (0.8, 1.0), 0.4),
    "hard": ((1.0, 1.6), (0.4, 0.6), (0.5, 0.85), 0.0),
}

# The least visibility (contrast over clutter, see synth.fracture_visibility) each tier's
# fracture must show; a site where it would not is drawn again. Calibrated on generated
# images (docs/synth.md): without it some "easy" lines vanished in the dense ends of bones.
MIN_VISIBILITY: dict[str, float] = {"easy": 4.0, "moderate": 2.5, "hard": 1.3}


@dataclass(frozen=True, slots=True)
class PlacedFracture:
    """A fracture placed on one bone of a scene, with its ground-truth segment."""

    bone_index: int
    fracture: BoneFracture
    segment: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels


def place_fracture(
    rng: np.random.Generator,
    bones: tuple[Bone, ...],
    height: int,
    width: int,
    fracture_type: str,
    difficulty: str,
    allowed: tuple[str, ...] = ("",),
) -> PlacedFracture | None:
    """Choose a visible bone and position, and build the fracture; None if none is visible.

    ``allowed`` are name prefixes of the bones that may break (all by default).
    """
    bones = tuple(
        b if b.name.startswith(allowed) else dataclasses.replace(b, fracture_weight=0.0)
        for b in bones
    )
    choice = _choose_site(rng, bones, height, width)
    if choice is None:
        return None
    index, u0 = choice
    bone = bones[index]
    scale = max(height, width) / 512.0
    radius = bone.radius_at(u0)
    if fracture_type == "buckle":  # at a metaphysis, if one is in view
        site = _metaphysis(rng, bones, height, width)
        if site is not None:
            index, u0 = site
            bone = bones[index]
            radius = bone.radius_at(u0)
    fracture = _build(rng, fracture_type, difficulty, u0, radius, scale)
    return PlacedFracture(index, fracture, _segment(bone, fracture, u0, radius))


def distractors(
    rng: np.random.Generator, bone: Bone, young: bool, scale: float
) -> tuple[Lucency, ...]:
    """Nutrient canals and growth plates for one bone (in negatives and positives alike)."""
    out: list[Lucency] = []
    length = bone.length
    if bone.fracture_weight > 0 and length > 6 * bone.radius and rng.random() < 0.35:
        u0 = float(rng.uniform(0.3, 0.7)) * length
        radius = bone.radius_at(u0)
        side = 1.0 if rng.random() < 0.5 else -1.0
        inner = radius * (1 - bone.cortex) - 1
        d_lo, d_hi = (inner, radius + 2) if side > 0 else (-radius - 2, -inner)
        slope = side * math.tan(math.radians(float(rng.uniform(55, 75))))
        out.append(
            Lucency(
                u0,
                slope,
                float(rng.uniform(0.8, 1.4)) * scale,
                float(rng.uniform(0.35, 0.7)),
                d_lo,
                d_hi,
            )
        )
    if young and bone.physes:
        for flare, end in ((bone.flare0, 0.0), (bone.flare1, 1.0)):
            if flare < 1.3:
                continue
            offset = float(rng.uniform(0.35, 0.6)) * bone.flare_len * length
            u0 = offset if end == 0.0 else length - offset
            radius = bone.radius_at(u0) + 2
            out.append(
                Lucency(
                    u0,
                    float(rng.normal(0, 0.08)),
                    float(rng.uniform(1.2, 2.0)) * scale,
                    float(rng.uniform(0.5, 0.8)),
                    -radius,
                    radius,
                    wave_px=float(rng.uniform(0.5, 2.0)) * scale,
                    wave_freq=float(rng.uniform(0.1, 0.3)),
                )
            )
    return tuple(out)


def _choose_site(
    rng: np.random.Generator, bones: tuple[Bone, ...], height: int, width: int
) -> tuple[int, float] | None:
    margin_x, margin_y = 0.1 * width, 0.1 * height
    sites: list[tuple[int, float]] = []
    weights: list[float] = []
    for i, bone in enumerate(bones):
        if bone.fracture_weight <= 0:
            continue
        lo, hi = bone.fracture_range
        for s in np.linspace(lo, hi, 12):
            x, y = bone.to_image(float(s) * bone.length, 0.0)
            if margin_x < x < width - margin_x and margin_y < y < height - margin_y:
                sites.append((i, float(s) * bone.length))
                weights.append(bone.fracture_weight * bone.length)
    if not sites:
        return None
    p = np.asarray(weights) / np.sum(weights)
    i, u0 = sites[int(rng.choice(len(sites), p=p))]
    step = (bones[i].fracture_range[1] - bones[i].fracture_range[0]) * bones[i].length / 12
    return i, u0 + float(rng.uniform(-0.5, 0.5)) * step


def _metaphysis(
    rng: np.random.Generator, bones: tuple[Bone, ...], height: int, width: int
) -> tuple[int, float] | None:
    """Buckle fractures sit where a flare meets the shaft; pick one in view."""
    sites: list[tuple[int, float]] = []
    for i, bone in enumerate(bones):
        if bone.fracture_weight <= 0:
            continue
        for flare, at_start in ((bone.flare0, True), (bone.flare1, False)):
            if flare < 1.3:
                continue
            from_end = float(rng.uniform(1.0, 1.8)) * bone.flare_len * bone.length
            u0 = from_end if at_start else bone.length - from_end
            x, y = bone.to_image(u0, 0.0)
            if 0.1 * width < x < 0.9 * width and 0.1 * height < y < 0.9 * height:
                sites.append((i, u0))
    if not sites:
        return None
    return sites[int(rng.integers(len(sites)))]


def _build(
    rng: np.random.Generator, kind: str, tier: str, u0: float, radius: float, scale: float
) -> BoneFracture:
    (g_lo, g_hi), (dp_lo, dp_hi), (c_lo, c_hi), shift = _TIERS[tier]
    gap = float(rng.uniform(g_lo, g_hi)) * scale
    depth = float(rng.uniform(dp_lo, dp_hi))
    cover = float(rng.uniform(c_lo, c_hi))
    if kind == "hairline":
        gap *= 0.6
        depth *= 0.85
        cover = min(cover, float(rng.uniform(0.4, 0.9)))
    if kind == "buckle":
        bump = {"easy": (0.3, 0.45), "moderate": (0.15, 0.25), "hard": (0.08, 0.14)}[tier]
        sides = (1, -1) if rng.random() < 0.5 else ((1,) if rng.random() < 0.5 else (-1,))
        return BoneFracture(
            buckle=Buckle(
                u0,
                float(rng.uniform(*bump)),
                float(rng.uniform(1.5, 3.0)) * radius / 4,
                sides,
                float(rng.uniform(0.1, 0.35)) * depth,
            )
        )
    d_lo, d_hi = _coverage(rng, radius, cover)
    jag = float(rng.uniform(0.2, 1.0)) * scale
    if kind == "comminuted":
        return _comminuted(rng, u0, radius, gap, depth, d_lo, d_hi, shift, jag)
    slope = float(rng.normal(0, 0.15))
    if kind == "oblique":
        slope = float(rng.choice([-1, 1])) * math.tan(math.radians(float(rng.uniform(30, 60))))
    cut = Cut(u0, slope, gap, depth, d_lo, d_hi, jag_px=jag, jag_freq=float(rng.uniform(0.2, 0.6)))
    moved = Motion()
    if kind == "displaced":
        k = max(shift, 0.12 if tier == "hard" else 0.0)
        moved = Motion(
            du=float(rng.uniform(-0.6, 0.8)) * radius * k,
            dd=float(rng.choice([-1, 1])) * float(rng.uniform(0.4, 1.0)) * radius * k,
            angle=math.radians(float(rng.uniform(-15, 15)) * k),
            pivot_u=u0,
        )
    elif kind == "oblique" and shift:
        moved = Motion(
            du=-float(rng.uniform(0.1, 0.4)) * radius * shift,
            dd=float(rng.uniform(-0.2, 0.2)) * radius * shift,
            pivot_u=u0,
        )
    return BoneFracture(cuts=(cut,), motions=(Motion(), moved))


def _comminuted(
    rng: np.random.Generator,
    u0: float,
    radius: float,
    gap: float,
    depth: float,
    d_lo: float,
    d_hi: float,
    shift: float,
    jag: float,
) -> BoneFracture:
    n = int(rng.integers(2, 4))
    slopes = [float(rng.uniform(-0.9, 0.9)) for _ in range(n)]
    spacing = radius * (0.8 + max(abs(s) for s in slopes) * 2.2)
    cuts = tuple(
        Cut(u0 + (i - (n - 1) / 2) * spacing, slopes[i], gap, depth, d_lo, d_hi, jag_px=jag)
        for i in range(n)
    )
    k = max(shift, 0.1)
    motions = [Motion()]
    for i in range(1, n + 1):
        motions.append(
            Motion(
                du=float(rng.uniform(-0.2, 0.3)) * radius * k,
                dd=float(rng.uniform(-0.6, 0.6)) * radius * k,
                angle=math.radians(float(rng.uniform(-12, 12)) * k),
                pivot_u=cuts[min(i, n - 1)].u0,
            )
        )
    return BoneFracture(cuts=cuts, motions=tuple(motions))


def _coverage(rng: np.random.Generator, radius: float, cover: float) -> tuple[float, float]:
    """The part of the width a line crosses: all of it, or from one cortex inwards."""
    if cover >= 0.999:
        return -radius - 3, radius + 3
    width = 2 * radius * cover
    if rng.random() < 0.5:
        return radius - width, radius + 3
    return -radius - 3, -radius + width


def _segment(
    bone: Bone, fracture: BoneFracture, u0: float, radius: float
) -> tuple[float, float, float, float]:
    """The ground-truth line segment, in image pixels, clipped to the bone."""
    if fracture.buckle is not None:
        sides = fracture.buckle.sides
        d_lo = -radius if -1 in sides else 0.0
        d_hi = radius if 1 in sides else 0.0
        a, b = bone.to_image(u0, d_lo * 0.95), bone.to_image(u0, d_hi * 0.95)
        return (a[0], a[1], b[0], b[1])
    first = fracture.cuts[0]  # comminuted: the first line, at the edge of the fixed fragment
    lo = max(first.d_lo, -radius) * 0.95
    hi = min(first.d_hi, radius) * 0.95
    a = bone.to_image(first.u0 + lo * first.slope, lo)
    b = bone.to_image(first.u0 + hi * first.slope, hi)
    return (a[0], a[1], b[0], b[1])
