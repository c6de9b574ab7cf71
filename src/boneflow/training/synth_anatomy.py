"""Anatomy of the synthetic radiographs: skeletons in body units and the view onto them.

The upper limb is one skeleton (shoulder girdle, humerus, radius and ulna, carpus,
metacarpals, phalanges) and each upper-limb class is a view onto it (where the detector
was centred, how much it covers), so a forearm film shows the wrist and elbow ends as a
real one does. The lower leg and the "other" class (chest or pelvis) have their own.
Body units: the forearm is 1.0 long (about 25 cm).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from boneflow.training.synth_raster import Bone

Point = tuple[float, float]


@dataclass(frozen=True, slots=True)
class Tissue:
    """A soft-tissue capsule (body units until placed)."""

    x0: float
    y0: float
    x1: float
    y1: float
    radius: float
    density: float = 1.0


@dataclass(frozen=True, slots=True)
class Plate:
    """A flat bone (scapula, ilium) as a polygon with a denser rim."""

    points: tuple[Point, ...]
    density: float
    rim: float  # rim thickness (body units until placed)


@dataclass(frozen=True, slots=True)
class Blob:
    """An elliptical soft-tissue density (positive) or air space (negative)."""

    cx: float
    cy: float
    ax: float
    ay: float
    angle_deg: float
    density: float


@dataclass(frozen=True)
class Anatomy:
    """Everything drawn for one image; body units, or pixels once placed."""

    bones: tuple[Bone, ...]
    tissues: tuple[Tissue, ...] = ()
    plates: tuple[Plate, ...] = ()
    blobs: tuple[Blob, ...] = ()
    anchor: Point = (0.0, 0.0)  # centre of the view
    axis_deg: float = 90.0  # direction of the part's long axis (90 = down the image)
    view_units: float = 1.0  # body units covered by the image height
    px_per_unit: float = 1.0


# Which bones a fracture of each class may be drawn on (name prefixes): the bones the film
# is taken for, not whatever else happens to be in the field (ribs on an elbow film).
FRACTURE_BONES: dict[str, tuple[str, ...]] = {
    "hand": ("finger", "thumb"),
    "wrist": ("radius", "ulna", "scaphoid", "finger2_0", "finger3_0", "finger4_0", "thumb_0"),
    "forearm": ("radius", "ulna"),
    "elbow": ("humerus", "radius", "ulna"),
    "humerus": ("humerus",),
    "shoulder": ("humerus", "clavicle"),
    "lower_leg": ("tibia", "fibula"),
    "other": ("rib", "clavicle", "femoral_neck", "pubic_ramus", "femur"),
}


def build_anatomy(
    rng: np.random.Generator, body_part: str, view: str, young: bool, variant: str
) -> Anatomy:
    """The skeleton and the view for one image of ``body_part`` (body units)."""
    if body_part == "lower_leg":
        return _lower_leg(rng, view, young)
    if body_part == "other":
        return _pelvis(rng) if variant == "pelvis" else _chest(rng)
    return _upper_limb(rng, body_part, view, young)


def place(
    anatomy: Anatomy, height: int, width: int, rng: np.random.Generator, mirror: bool
) -> Anatomy:
    """Map body units to pixels: scale, rotation, shift and (for the other side) mirroring."""
    scale = height / anatomy.view_units * float(rng.uniform(0.88, 1.12))
    theta = math.radians(90.0 - anatomy.axis_deg + float(rng.normal(0, 6)))
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    shift_x = width / 2 + float(rng.uniform(-0.06, 0.06)) * width
    shift_y = height / 2 + float(rng.uniform(-0.06, 0.06)) * height
    ax, ay = anatomy.anchor
    sign = -1.0 if mirror else 1.0

    def pt(x: float, y: float) -> Point:
        rx, ry = x - ax, y - ay
        px, py = cos_t * rx - sin_t * ry, sin_t * rx + cos_t * ry
        return (shift_x + sign * scale * px, shift_y + scale * py)

    bones = []
    for b in anatomy.bones:
        (x0, y0), (x1, y1) = pt(b.x0, b.y0), pt(b.x1, b.y1)
        bones.append(
            dataclasses.replace(
                b, x0=x0, y0=y0, x1=x1, y1=y1, radius=b.radius * scale, bend=b.bend * sign
            )
        )
    tissues = []
    for t in anatomy.tissues:
        (x0, y0), (x1, y1) = pt(t.x0, t.y0), pt(t.x1, t.y1)
        tissues.append(Tissue(x0, y0, x1, y1, t.radius * scale, t.density))
    plates = tuple(
        Plate(tuple(pt(x, y) for x, y in p.points), p.density, p.rim * scale)
        for p in anatomy.plates
    )
    blobs = []
    for bl in anatomy.blobs:
        cx, cy = pt(bl.cx, bl.cy)
        angle = sign * (bl.angle_deg + math.degrees(theta))
        blobs.append(Blob(cx, cy, bl.ax * scale, bl.ay * scale, angle, bl.density))
    return dataclasses.replace(
        anatomy,
        bones=tuple(bones),
        tissues=tuple(tissues),
        plates=plates,
        blobs=tuple(blobs),
        anchor=(shift_x, shift_y),
        px_per_unit=scale,
    )


# ---- helpers ------------------------------------------------------------------------


def _add(p: Point, q: Point, k: float = 1.0) -> Point:
    return (p[0] + k * q[0], p[1] + k * q[1])


def _dir(deg: float) -> Point:
    return (math.cos(math.radians(deg)), math.sin(math.radians(deg)))


def _j(rng: np.random.Generator, spread: float = 0.08) -> float:
    """A multiplicative jitter around 1."""
    return float(rng.uniform(1 - spread, 1 + spread))


def _long_bone(name: str, a: Point, b: Point, radius: float, **kw: object) -> Bone:
    return Bone(name, a[0], a[1], b[0], b[1], radius, **kw)  # type: ignore[arg-type]


# ---- upper limb ---------------------------------------------------------------------

# Where each upper-limb class looks: (landmark, shift along the axis, view height, axis).
_UPPER_VIEWS: dict[str, tuple[str, float, float, str]] = {
    "shoulder": ("shoulder", 0.0, 0.95, "humerus"),
    "humerus": ("mid_humerus", 0.0, 1.75, "humerus"),
    "elbow": ("elbow", 0.0, 0.62, "forearm"),
    "forearm": ("mid_forearm", 0.0, 1.35, "forearm"),
    "wrist": ("wrist", 0.06, 0.5, "forearm"),
    "hand": ("wrist", 0.36, 0.95, "forearm"),
}


def _upper_limb(rng: np.random.Generator, part: str, view: str, young: bool) -> Anatomy:
    lateral = view == "LAT"
    bones: list[Bone] = []
    tissues: list[Tissue] = []
    k_phys = young
    # Humerus hangs down from the shoulder, slightly abducted.
    abduct = float(rng.uniform(-4, 18))
    hum_dir = _dir(90 - abduct)
    shoulder: Point = (0.0, 0.0)
    hum_len = 1.25 * _j(rng)
    elbow = _add(shoulder, hum_dir, hum_len)
    perp_h = (-hum_dir[1], hum_dir[0])  # points medially (+x)
    bones.append(
        _long_bone(
            "humeral_head",
            _add(shoulder, (0.0, -0.02)),
            _add(shoulder, (0.04, 0.05)),
            0.105 * _j(rng),
            cortex=0.1,
            density=0.85,
        )
    )
    bones.append(
        _long_bone(
            "humerus",
            _add(shoulder, hum_dir, 0.08),
            _add(elbow, hum_dir, -0.02),
            0.042 * _j(rng),
            flare0=1.7,
            flare1=1.9,
            flare_len=0.1,
            cortex=0.38,
            fracture_weight=1.0,
            fracture_range=(0.06, 0.94),
            physes=k_phys,
        )
    )
    # Shoulder girdle: glenoid, scapula, acromion, clavicle, coracoid, ribs.
    glen = _add(shoulder, (0.13, 0.0))
    bones.append(
        _long_bone(
            "glenoid",
            _add(glen, (0.0, -0.07)),
            _add(glen, (0.0, 0.07)),
            0.03,
            cortex=0.3,
            density=0.8,
        )
    )
    plates = [
        Plate(
            ((0.15, -0.08), (0.5, -0.22), (0.62, -0.16), (0.5, 0.6), (0.2, 0.12)),
            0.35 * _j(rng),
            0.03,
        )
    ]
    bones.append(
        _long_bone("acromion", (-0.02, -0.17), (0.26, -0.22), 0.028, cortex=0.3, density=0.8)
    )
    bones.append(_long_bone("coracoid", (0.16, -0.1), (0.1, -0.05), 0.022, density=0.7))
    bones.append(
        _long_bone(
            "clavicle",
            (0.0, -0.2),
            (0.85, -0.06 + float(rng.uniform(-0.05, 0.05))),
            0.032 * _j(rng),
            flare0=1.4,
            flare1=1.3,
            bend=0.06,
            cortex=0.3,
            fracture_weight=0.6,
            fracture_range=(0.2, 0.8),
        )
    )
    for i in range(6):
        y = -0.15 + 0.17 * i
        bones.append(
            _long_bone(
                f"rib{i}",
                (0.3, y),
                (1.3, y + 0.35),
                0.022,
                bend=-0.12,
                cortex=0.35,
                density=0.55,
                fracture_weight=0.2,
            )
        )
    tissues.append(Tissue(shoulder[0], shoulder[1], elbow[0], elbow[1], 0.17 * _j(rng), 0.9))
    tissues.append(Tissue(-0.05, -0.1, 0.9, 0.2, 0.3, 0.8))
    # Forearm: flexed at the elbow (lateral views strongly).
    flex = float(rng.uniform(65, 100)) if lateral else float(rng.uniform(-12, 8))
    fa_dir = _dir(90 - abduct - flex)
    perp = (-fa_dir[1], fa_dir[0])
    fa_len = 1.0 * _j(rng, 0.06)
    wrist = _add(elbow, fa_dir, fa_len)
    sep = 0.018 if lateral else 0.055 * _j(rng, 0.2)
    bones.append(
        _long_bone(
            "capitellum",
            _add(elbow, perp_h, -0.06),
            _add(elbow, perp_h, -0.01),
            0.045,
            density=0.8,
            physes=k_phys,
        )
    )
    bones.append(
        _long_bone(
            "trochlea", _add(elbow, perp_h, 0.0), _add(elbow, perp_h, 0.06), 0.05, density=0.8
        )
    )
    ulna_a = _add(_add(elbow, perp, sep * 0.6), fa_dir, -0.06)
    bones.append(
        _long_bone(
            "ulna",
            ulna_a,
            _add(_add(wrist, perp, sep), fa_dir, -0.02),
            0.026 * _j(rng),
            flare0=2.0,
            flare1=1.35,
            flare_len=0.09,
            cortex=0.4,
            fracture_weight=0.8,
            fracture_range=(0.06, 0.95),
            physes=k_phys,
        )
    )
    bones.append(
        _long_bone(
            "radius",
            _add(_add(elbow, perp, -sep * 0.9), fa_dir, 0.05),
            _add(wrist, perp, -sep * 1.1),
            0.029 * _j(rng),
            flare0=1.4,
            flare1=1.8,
            flare_len=0.1,
            cortex=0.38,
            bend=-0.02,
            fracture_weight=1.0,
            fracture_range=(0.05, 0.95),
            physes=k_phys,
        )
    )
    tissues.append(Tissue(elbow[0], elbow[1], wrist[0], wrist[1], 0.11 * _j(rng), 1.0))
    _hand(rng, bones, tissues, wrist, fa_dir, lateral)
    landmarks = {
        "shoulder": _add(shoulder, (0.12, 0.08)),
        "mid_humerus": _add(shoulder, hum_dir, hum_len * 0.5),
        "elbow": elbow,
        "mid_forearm": _add(elbow, fa_dir, fa_len * 0.5),
        "wrist": wrist,
    }
    landmark, along, height, axis = _UPPER_VIEWS[part]
    axis_dir = hum_dir if axis == "humerus" else fa_dir
    anchor = _add(landmarks[landmark], axis_dir, along)
    axis_deg = math.degrees(math.atan2(axis_dir[1], axis_dir[0]))
    return Anatomy(
        tuple(bones), tuple(tissues), tuple(plates), (), anchor, axis_deg, height * _j(rng, 0.05)
    )


def _hand(
    rng: np.random.Generator,
    bones: list[Bone],
    tissues: list[Tissue],
    wrist: Point,
    axis: Point,
    lateral: bool,
) -> None:
    perp = (-axis[1], axis[0])
    base_deg = math.degrees(math.atan2(axis[1], axis[0]))
    hs = 0.8 * _j(rng, 0.06)  # hand size relative to the forearm
    # Carpus: two rows of four small bones.
    for row, along in enumerate((0.06, 0.13)):
        for i, off in enumerate((-0.075, -0.026, 0.022, 0.066)):
            c = _add(
                _add(wrist, axis, along * hs + 0.02), perp, off * hs * (0.4 if lateral else 1.0)
            )
            ang = math.radians(base_deg + float(rng.uniform(-40, 40)))
            h = 0.012 * hs
            a, b = (
                _add(c, (math.cos(ang), math.sin(ang)), -h),
                _add(c, (math.cos(ang), math.sin(ang)), h),
            )
            name = "scaphoid" if (row, i) == (0, 0) else f"carpal{row}{i}"
            bones.append(
                _long_bone(
                    name,
                    a,
                    b,
                    0.028 * hs * _j(rng, 0.15),
                    cortex=0.2,
                    density=0.9,
                    fracture_weight=0.3 if name == "scaphoid" else 0.0,
                    fracture_range=(0.3, 0.7),
                )
            )
    spread = 0.0 if lateral else float(rng.uniform(0.6, 1.4))
    finger_angles = (-13.0, -4.0, 4.0, 12.0)
    mc_offsets = (-0.055, -0.018, 0.018, 0.052)
    mc_len = (0.3, 0.31, 0.29, 0.26)
    ph_len = ((0.19, 0.12, 0.085), (0.21, 0.135, 0.09), (0.2, 0.13, 0.09), (0.16, 0.1, 0.08))
    flexion = float(rng.uniform(0, 25)) if lateral else 0.0
    for f in range(4):
        ang = base_deg + finger_angles[f] * spread + float(rng.normal(0, 2))
        start = _add(
            _add(wrist, axis, 0.2 * hs), perp, mc_offsets[f] * hs * (0.35 if lateral else 1.0)
        )
        _ray(rng, bones, tissues, start, ang, hs, mc_len[f], ph_len[f], flexion, f"finger{f + 2}")
    thumb_ang = base_deg - (20 if lateral else float(rng.uniform(28, 45)))
    start = _add(_add(wrist, axis, 0.15 * hs), perp, -0.085 * hs)
    _ray(rng, bones, tissues, start, thumb_ang, hs, 0.2, (0.14, 0.1), 0.0, "thumb")
    tissues.append(
        Tissue(*_add(wrist, axis, 0.08 * hs), *_add(wrist, axis, 0.4 * hs), 0.14 * hs, 0.9)
    )


def _ray(
    rng: np.random.Generator,
    bones: list[Bone],
    tissues: list[Tissue],
    start: Point,
    ang: float,
    hs: float,
    mc_len: float,
    ph_len: tuple[float, ...],
    flexion: float,
    name: str,
) -> None:
    radii = (0.021, 0.019, 0.016, 0.014)
    lengths = (mc_len, *ph_len)
    p = start
    tip = start
    for i, length in enumerate(lengths):
        direction = _dir(ang + flexion * i)
        q = _add(p, direction, length * hs * _j(rng, 0.05))
        last = i == len(lengths) - 1
        bones.append(
            _long_bone(
                f"{name}_{i}",
                p,
                _add(q, direction, -0.012 * hs),
                radii[i] * hs * _j(rng, 0.08),
                flare0=1.45,
                flare1=1.05 if last else 1.35,
                flare_len=0.16,
                cortex=0.4,
                fracture_weight=0.5 if i < 2 else 0.25,
                fracture_range=(0.15, 0.85),
                physes=i > 0,
            )
        )
        p = _add(q, direction, 0.012 * hs)
        tip = q
    tissues.append(Tissue(*_add(start, _dir(ang), 0.1 * hs), *tip, 0.042 * hs * _j(rng, 0.1), 1.0))


# ---- lower leg ----------------------------------------------------------------------


def _lower_leg(rng: np.random.Generator, view: str, young: bool) -> Anatomy:
    lateral = view == "LAT"
    tib_len = 1.4 * _j(rng, 0.06)
    knee: Point = (0.0, 0.0)
    ankle: Point = (0.02, tib_len)
    fib_x = -0.03 if lateral else -0.1 * _j(rng, 0.1)
    bones = [
        _long_bone(
            "femur",
            (0.0, -1.0),
            (0.0, -0.03),
            0.06 * _j(rng),
            flare1=1.9,
            flare_len=0.12,
            cortex=0.38,
        ),
        _long_bone(
            "tibia",
            _add(knee, (0.0, 0.05)),
            ankle,
            0.048 * _j(rng),
            flare0=1.95,
            flare1=1.55,
            flare_len=0.12,
            cortex=0.42,
            fracture_weight=1.0,
            fracture_range=(0.06, 0.95),
            physes=young,
        ),
        _long_bone(
            "fibula",
            (fib_x, 0.1),
            (fib_x - 0.005, tib_len + 0.04),
            0.02 * _j(rng),
            flare0=1.7,
            flare1=1.6,
            flare_len=0.08,
            cortex=0.4,
            fracture_weight=0.6,
            fracture_range=(0.1, 0.95),
            physes=young,
        ),
        _long_bone(
            "talus", (-0.06, tib_len + 0.09), (0.08, tib_len + 0.09), 0.055, cortex=0.2, density=0.9
        ),
    ]
    patella_x = -0.14 if lateral else float(rng.uniform(-0.02, 0.02))
    bones.append(
        _long_bone(
            "patella", (patella_x, -0.12), (patella_x, -0.02), 0.055, cortex=0.18, density=0.75
        )
    )
    if lateral:
        bones.append(
            _long_bone(
                "calcaneus",
                (0.0, tib_len + 0.16),
                (0.22, tib_len + 0.2),
                0.06,
                cortex=0.2,
                density=0.85,
            )
        )
    tissues = (
        Tissue(0.0, -0.9, 0.0, 0.1, 0.2, 0.9),
        Tissue(0.0, 0.05, 0.0, tib_len - 0.1, 0.16 * _j(rng), 1.0),
        Tissue(0.0, tib_len - 0.2, 0.03, tib_len + 0.1, 0.11, 1.0),
    )
    return Anatomy(tuple(bones), tissues, (), (), (0.0, tib_len * 0.5), 90.0, 1.8 * _j(rng, 0.05))


# ---- other: chest or pelvis -----------------------------------------------------------


def _chest(rng: np.random.Generator) -> Anatomy:
    bones: list[Bone] = []
    for i in range(12):
        y = -0.42 + 0.085 * i
        bones.append(
            _long_bone(
                f"vertebra{i}",
                (-0.022, y),
                (0.022, y),
                0.03 * (1 + 0.03 * i),
                cortex=0.18,
                density=0.8,
            )
        )
    for side in (-1.0, 1.0):
        for i in range(10):
            y = -0.4 + 0.08 * i + float(rng.normal(0, 0.005))
            span = 0.3 + 0.012 * i
            bones.append(
                _long_bone(
                    f"rib{i}{'L' if side > 0 else 'R'}",
                    (side * 0.04, y),
                    (side * (0.04 + span), y + 0.09 + 0.01 * i),
                    0.013,
                    bend=-0.22 * side,
                    cortex=0.35,
                    density=0.5,
                    fracture_weight=1.0,
                    fracture_range=(0.3, 0.85),
                )
            )
            bones.append(
                _long_bone(
                    f"ant_rib{i}",
                    (side * (0.04 + span), y + 0.1 + 0.01 * i),
                    (side * 0.12, y + 0.28),
                    0.012,
                    bend=0.12 * side,
                    cortex=0.3,
                    density=0.22,
                )
            )
        bones.append(
            _long_bone(
                "clavicle",
                (side * 0.05, -0.36),
                (side * 0.38, -0.43),
                0.022,
                bend=0.05 * side,
                cortex=0.3,
                density=0.8,
            )
        )
    blobs = (
        Blob(0.0, 0.05, 0.48, 0.62, 0.0, 1.0),
        Blob(-0.19, -0.02, 0.15, 0.36, 5.0, -0.75),
        Blob(0.19, -0.02, 0.15, 0.36, -5.0, -0.75),
        Blob(0.06, 0.18, 0.16, 0.14, 0.0, 0.5),
        Blob(0.0, 0.55, 0.5, 0.25, 0.0, 0.45),
    )
    return Anatomy(tuple(bones), (), (), blobs, (0.0, 0.0), 90.0, 1.05 * _j(rng, 0.05))


def _pelvis(rng: np.random.Generator) -> Anatomy:
    bones: list[Bone] = []
    plates: list[Plate] = []
    for side in (-1.0, 1.0):
        plates.append(
            Plate(
                (
                    (side * 0.08, -0.2),
                    (side * 0.38, -0.32),
                    (side * 0.42, -0.12),
                    (side * 0.28, 0.08),
                    (side * 0.1, 0.02),
                ),
                0.45,
                0.02,
            )
        )
        bones.append(
            _long_bone(
                "femoral_head",
                (side * 0.28, 0.12),
                (side * 0.3, 0.14),
                0.07,
                cortex=0.15,
                density=0.9,
            )
        )
        bones.append(
            _long_bone(
                "femoral_neck",
                (side * 0.3, 0.15),
                (side * 0.4, 0.28),
                0.045,
                cortex=0.3,
                density=0.9,
                fracture_weight=1.0,
            )
        )
        bones.append(
            _long_bone(
                "femur",
                (side * 0.4, 0.25),
                (side * 0.36, 0.9),
                0.06,
                flare0=1.6,
                cortex=0.4,
                fracture_weight=0.5,
            )
        )
        bones.append(
            _long_bone(
                "pubic_ramus",
                (side * 0.24, 0.2),
                (side * 0.03, 0.22),
                0.025,
                bend=0.2 * side,
                cortex=0.3,
                density=0.8,
                fracture_weight=0.7,
            )
        )
        bones.append(
            _long_bone(
                "ischium",
                (side * 0.22, 0.22),
                (side * 0.12, 0.36),
                0.03,
                bend=-0.2 * side,
                cortex=0.3,
                density=0.8,
            )
        )
    plates.append(Plate(((-0.09, -0.18), (0.09, -0.18), (0.04, 0.1), (-0.04, 0.1)), 0.5, 0.015))
    for i in range(3):
        y = -0.55 + 0.12 * i
        bones.append(
            _long_bone(f"vertebra{i}", (-0.04, y), (0.04, y), 0.045, cortex=0.18, density=0.8)
        )
    blobs = (Blob(0.0, 0.0, 0.6, 0.7, 0.0, 1.2), Blob(0.0, -0.3, 0.3, 0.25, 0.0, -0.2))
    _ = rng
    return Anatomy(tuple(bones), (), tuple(plates), blobs, (0.0, 0.05), 90.0, 1.1 * _j(rng, 0.05))
