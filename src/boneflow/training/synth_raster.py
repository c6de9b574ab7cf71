"""Rasterising synthetic bones: projected cortical shell and medulla, fractures, distractors.

A bone is a (slightly bent) capsule along an axis from ``(x0, y0)`` to ``(x1, y1)`` in
pixels. In its local coordinates ``u`` (pixels along the axis from the first end) and ``d``
(signed pixels across it) the projected path length through a hollow cylinder gives the
bright cortical edges and the fainter medulla of a real radiograph without any per-pixel
Python: everything is numpy over the bone's bounding box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]

# the classes of Canvas.anatomy(), in the order of their ids
ANATOMY_CLASSES = ("background", "bone", "overlap", "distractor")
BONE_PATH_PX = 1.0  # a pixel is on a bone where the projected path through it is longer
LUCENT_DEPTH = 0.15  # ... and on a distractor line where the line takes this much of it


@dataclass(frozen=True, slots=True)
class Bone:
    """One bone in image pixels (see the module docstring for its local coordinates)."""

    name: str
    x0: float
    y0: float
    x1: float
    y1: float
    radius: float  # shaft outer radius, pixels
    flare0: float = 1.0  # radius multiplier at the first end (metaphysis/epiphysis)
    flare1: float = 1.0
    flare_len: float = 0.15  # fraction of the length over which a flare fades
    cortex: float = 0.35  # cortical thickness / radius in the shaft
    density: float = 1.0
    bend: float = 0.0  # sagitta as a fraction of the length (ribs, clavicle)
    fracture_weight: float = 0.0  # how often this bone is chosen for a fracture
    fracture_range: tuple[float, float] = (0.15, 0.85)  # where along it (fraction)
    physes: bool = False  # flared ends get growth plates in young patients

    @property
    def length(self) -> float:
        """Axis length in pixels."""
        return max(math.hypot(self.x1 - self.x0, self.y1 - self.y0), 1e-3)

    def to_image(self, u: float, d: float) -> tuple[float, float]:
        """Image (x, y) of local coordinates (u along, d across)."""
        length = self.length
        tx, ty = (self.x1 - self.x0) / length, (self.y1 - self.y0) / length
        s = min(max(u / length, 0.0), 1.0)
        d_total = d + self.bend * length * 4.0 * s * (1.0 - s)
        return (self.x0 + u * tx - d_total * ty, self.y0 + u * ty + d_total * tx)

    def radius_at(self, u: float) -> float:
        """Outer radius (pixels) at ``u`` pixels along the axis."""
        g0, g1 = _flares(np.float32(u / self.length), self.flare_len)
        return float(self.radius * (1 + (self.flare0 - 1) * g0 + (self.flare1 - 1) * g1))


@dataclass(frozen=True, slots=True)
class Cut:
    """One fracture line in a bone's local coordinates: ``u = u0 + d * slope``."""

    u0: float
    slope: float  # tan of the obliquity (0 = transverse)
    gap_px: float  # 1/e half-width of the lucent line
    depth: float  # 0..1, how much bone the line removes at its centre
    d_lo: float  # the part of the width it crosses (incomplete fractures), pixels
    d_hi: float
    jag_px: float = 0.0  # amplitude of the zig-zag
    jag_freq: float = 0.3  # radians per pixel


@dataclass(frozen=True, slots=True)
class Motion:
    """How one fragment moved: rotation about ``(pivot_u, 0)`` then a shift, pixels."""

    du: float = 0.0
    dd: float = 0.0
    angle: float = 0.0
    pivot_u: float = 0.0


@dataclass(frozen=True, slots=True)
class Buckle:
    """A torus (buckle) fracture: the cortex bulges and a faint dense band crosses."""

    u0: float
    bump: float  # relative radius increase
    width_px: float
    sides: tuple[int, ...]  # +1, -1 or both
    band: float  # extra density of the compressed band


@dataclass(frozen=True, slots=True)
class BoneFracture:
    """A fracture of one bone: cuts (sorted by u0) and the motion of each fragment."""

    cuts: tuple[Cut, ...] = ()
    motions: tuple[Motion, ...] = ()  # len(cuts) + 1; the first fragment stays put
    buckle: Buckle | None = None


@dataclass(frozen=True, slots=True)
class Lucency:
    """A non-fracture lucent line (nutrient canal, growth plate) in local coordinates."""

    u0: float
    slope: float
    width_px: float
    depth: float
    d_lo: float
    d_hi: float
    wave_px: float = 0.0
    wave_freq: float = 0.2


@dataclass(frozen=True)
class Canvas:
    """Accumulated attenuation maps of one image, in body units."""

    height: int
    width: int
    px_per_unit: float
    bone: Array = field(init=False)
    soft: Array = field(init=False)
    # how many bones cover each pixel (capped at 2), and the distractor lines drawn on bone
    cover: npt.NDArray[np.uint8] = field(init=False)
    lucent: npt.NDArray[np.bool_] = field(init=False)

    def __post_init__(self) -> None:
        shape = (self.height, self.width)
        object.__setattr__(self, "bone", np.zeros(shape, np.float32))
        object.__setattr__(self, "soft", np.zeros(shape, np.float32))
        object.__setattr__(self, "cover", np.zeros(shape, np.uint8))
        object.__setattr__(self, "lucent", np.zeros(shape, np.bool_))

    def anatomy(self) -> npt.NDArray[np.uint8]:
        """Per pixel: 0 no bone, 1 one bone, 2 overlapping bones, 3 a distractor line.

        The classes of :data:`ANATOMY_CLASSES`; a training-only target (what a network
        must tell a fracture from: overlap edges, growth plates, nutrient canals).
        """
        classes = np.minimum(self.cover, 2)
        classes[self.lucent & (self.cover > 0)] = 3
        return classes


def draw_bone(
    canvas: Canvas,
    bone: Bone,
    texture: Array,
    fracture: BoneFracture | None = None,
    lucencies: tuple[Lucency, ...] = (),
) -> None:
    """Add one bone's projected density to ``canvas.bone`` (in place)."""
    extra = 0.0
    if fracture is not None:
        extra = max((abs(m.du) + abs(m.dd) for m in fracture.motions), default=0.0)
    reach = bone.radius * max(bone.flare0, bone.flare1, 1.0) * 1.6 + extra + 2
    reach += abs(bone.bend) * bone.length
    box = _box(canvas, (bone.x0, bone.x1), (bone.y0, bone.y1), reach)
    if box is None:
        return
    ys, xs, sl = box
    u, d = _local(bone, xs, ys)
    tex = texture[sl]
    if fracture is None or not fracture.cuts:
        dens = _profile(bone, u, d, tex, fracture.buckle if fracture else None)
    else:
        dens = _fragments(bone, u, d, tex, fracture)
    inside = dens > np.float32(BONE_PATH_PX)
    canvas.cover[sl] = np.minimum(canvas.cover[sl] + inside, 2)
    for luc in lucencies:
        lucency = luc.depth * _line_weight(u, d, luc.u0, luc.slope, luc.width_px, luc, bone)
        canvas.lucent[sl] |= inside & (lucency > LUCENT_DEPTH)
        dens *= 1 - lucency
    canvas.bone[sl] += dens * (bone.density / canvas.px_per_unit)


def draw_tissue(
    canvas: Canvas, x0: float, y0: float, x1: float, y1: float, radius: float, density: float
) -> None:
    """Soft tissue: a capsule of cylindrical cross-section, merged by maximum."""
    box = _box(canvas, (x0, x1), (y0, y1), radius + 2)
    if box is None:
        return
    ys, xs, sl = box
    tissue = Bone("tissue", x0, y0, x1, y1, radius)
    u, d = _local(tissue, xs, ys)
    rho2 = d * d + np.square(np.clip(u, 0, tissue.length) - u)
    path = 2 * np.sqrt(np.maximum(radius * radius - rho2, 0)) * (density / canvas.px_per_unit)
    np.maximum(canvas.soft[sl], path.astype(np.float32), out=canvas.soft[sl])


def _box(
    canvas: Canvas, xs: tuple[float, float], ys: tuple[float, float], reach: float
) -> tuple[Array, Array, tuple[slice, slice]] | None:
    x_lo = max(int(min(xs) - reach), 0)
    x_hi = min(int(max(xs) + reach) + 1, canvas.width)
    y_lo = max(int(min(ys) - reach), 0)
    y_hi = min(int(max(ys) + reach) + 1, canvas.height)
    if x_lo >= x_hi or y_lo >= y_hi:
        return None
    gx = np.arange(x_lo, x_hi, dtype=np.float32)[None, :]
    gy = np.arange(y_lo, y_hi, dtype=np.float32)[:, None]
    return gy, gx, (slice(y_lo, y_hi), slice(x_lo, x_hi))


def _local(bone: Bone, xs: Array, ys: Array) -> tuple[Array, Array]:
    length = bone.length
    tx, ty = (bone.x1 - bone.x0) / length, (bone.y1 - bone.y0) / length
    dx, dy = xs - np.float32(bone.x0), ys - np.float32(bone.y0)
    u = (dx * np.float32(tx) + dy * np.float32(ty)).astype(np.float32)
    d = (dy * np.float32(tx) - dx * np.float32(ty)).astype(np.float32)
    if bone.bend:
        s = np.clip(u / np.float32(length), 0, 1)
        d = d - np.float32(bone.bend * length * 4.0) * s * (1 - s)
    return u, d


def _flares(s: Array | np.float32, flare_len: float) -> tuple[Array, Array]:
    sc = np.clip(s, 0, 1)
    g0 = np.exp(-np.square(sc / np.float32(flare_len)))
    g1 = np.exp(-np.square((1 - sc) / np.float32(flare_len)))
    return g0, g1


def _profile(bone: Bone, u: Array, d: Array, tex: Array, buckle: Buckle | None) -> Array:
    """Projected density of the intact bone at local coordinates (u, d)."""
    length = bone.length
    g0, g1 = _flares(u / np.float32(length), bone.flare_len)
    radius = np.float32(bone.radius) * (
        1 + np.float32(bone.flare0 - 1) * g0 + np.float32(bone.flare1 - 1) * g1
    )
    ends = np.maximum(g0, g1)
    if buckle is not None:
        bump = np.exp(-np.square((u - np.float32(buckle.u0)) / np.float32(buckle.width_px)))
        side = np.zeros_like(d)
        for sign in buckle.sides:
            side += (d * sign > 0).astype(np.float32)
        radius = radius * (1 + np.float32(buckle.bump) * bump * side)
    cortex = np.float32(bone.cortex) * (1 - 0.75 * ends)
    inner = radius * (1 - np.maximum(cortex, np.float32(0.06)))
    outside = np.clip(u, 0, np.float32(length)) - u
    rho2 = d * d + outside * outside
    outer_path = 2 * np.sqrt(np.maximum(radius * radius - rho2, 0))
    inner_path = 2 * np.sqrt(np.maximum(inner * inner - rho2, 0))
    medulla = (np.float32(0.22) + np.float32(0.5) * ends) * tex
    dens = (outer_path - inner_path) + medulla * inner_path
    if buckle is not None and buckle.band:
        band = np.exp(-np.square((u - np.float32(buckle.u0)) / np.float32(1.5)))
        dens = dens + np.float32(buckle.band) * band * outer_path
    out: Array = dens.astype(np.float32)
    return out


def _fragments(bone: Bone, u: Array, d: Array, tex: Array, fracture: BoneFracture) -> Array:
    """Sum of the moved fragments, each clipped to its side of the cuts, with gaps."""
    cuts = fracture.cuts
    total = np.zeros_like(u)
    for k, motion in enumerate(fracture.motions):
        uk, dk = _unmove(u, d, motion)
        mask = np.ones_like(u)
        if k > 0:
            mask *= _sigmoid(_signed(uk, dk, cuts[k - 1]))
        if k < len(cuts):
            mask *= _sigmoid(-_signed(uk, dk, cuts[k]))
        total += _profile(bone, uk, dk, tex, fracture.buckle) * mask
    for cut in cuts:
        total *= 1 - cut.depth * _cut_weight(u, d, cut)
    return total


def _unmove(u: Array, d: Array, motion: Motion) -> tuple[Array, Array]:
    uu = u - np.float32(motion.du + motion.pivot_u)
    dd = d - np.float32(motion.dd)
    if motion.angle:
        c, s = np.float32(math.cos(-motion.angle)), np.float32(math.sin(-motion.angle))
        uu, dd = c * uu - s * dd, s * uu + c * dd
    return uu + np.float32(motion.pivot_u), dd


def _signed(u: Array, d: Array, cut: Cut) -> Array:
    q = (u - np.float32(cut.u0) - d * np.float32(cut.slope)) / np.float32(
        math.sqrt(1 + cut.slope * cut.slope)
    )
    if cut.jag_px:
        q = q + np.float32(cut.jag_px) * np.sin(d * np.float32(cut.jag_freq))
    return q.astype(np.float32)


def _cut_weight(u: Array, d: Array, cut: Cut) -> Array:
    q = _signed(u, d, cut)
    across = _sigmoid((d - np.float32(cut.d_lo)) / 0.7) * _sigmoid((np.float32(cut.d_hi) - d) / 0.7)
    weight: Array = np.exp(-np.square(q / np.float32(cut.gap_px))) * across
    return weight


def _line_weight(
    u: Array, d: Array, u0: float, slope: float, width: float, luc: Lucency, bone: Bone
) -> Array:
    q = (u - np.float32(u0) - d * np.float32(slope)) / np.float32(math.sqrt(1 + slope * slope))
    if luc.wave_px:
        q = q + np.float32(luc.wave_px) * np.sin(d * np.float32(luc.wave_freq))
    across = _sigmoid((d - np.float32(luc.d_lo)) / 0.7) * _sigmoid((np.float32(luc.d_hi) - d) / 0.7)
    _ = bone
    weight: Array = np.exp(-np.square(q / np.float32(width))) * across
    return weight


def _sigmoid(x: Array) -> Array:
    return (0.5 + 0.5 * np.tanh(np.clip(x, -30, 30))).astype(np.float32)
