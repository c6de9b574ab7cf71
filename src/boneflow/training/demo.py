"""Demo models: a router and one fracture model trained on synthetic radiographs in minutes.

Images come straight from :func:`boneflow.training.synth.generate_image`; each synthetic
patient is its own random stream, and the train, validation and test patients come from
disjoint streams, so the reported numbers are on held-out patients. Every image is made
once and preprocessed at both models' input sizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import numpy as np
import numpy.typing as npt

from boneflow.config import Settings
from boneflow.findings import BODY_PARTS
from boneflow.models.registry import FRACTURE_LABELS, ModelManifest
from boneflow.models.transforms import PreprocessParams
from boneflow.training.engine import (
    FitConfig,
    ImageSet,
    build_image_set,
    resolve_device,
    scoring_seconds,
)
from boneflow.training.synth import SYNTH_VERSION
from boneflow.training.train import ProgressBar, TaskData, progress_bar, train_and_register

log = logging.getLogger(__name__)

FRACTURE_PARTS: tuple[str, ...] = tuple(p for p in BODY_PARTS if p != "other")
ROUTER_NAME = "router"
FRACTURE_NAME = "fracture-limbs"
_SPLIT_KEYS = {"train": 1, "val": 2, "test": 3}


@dataclass(frozen=True, slots=True)
class DemoPlan:
    """How many synthetic images, at what size, and how long to train.

    Budget on 2 idle CPU cores (a fast AVX-512/AMX one, then a slow AVX2-only one):
    generation and preprocessing at 512 px ~1.1 / 1.5-2.3 min (one process per core); the
    router (ResNet-10 with half the channels, stride-2 stem, at 128 px) ~1.0-1.3 min for
    3 epochs on the slow one (the full-width ResNet-10 before round 15: ~2.5 min for 2
    epochs there, cut short by ``router_max_minutes``); the fracture model (FractureNet at
    512 px, trained on 128 px crops around the fracture line and on bone, plus
    hard-negative mining after each epoch but the last) what is left, at most 7.5 min
    (6.75 before round 15). After its time limit come its whole-image scoring passes -
    the last epoch's validation (which calibration and the threshold reuse) and the test,
    each image scored with its mirror image (``fracture_mirror``) and, where the machine
    affords it, turned by +/- ``fracture_rotation`` degrees as well (three views: three
    times the passes; kept when the fracture model still trains ``rotation_min_minutes``)
    - whose cost is measured on this machine before training
    (:func:`~boneflow.training.engine.scoring_seconds`; one view: 0.9-1.3 min for the 1180
    images on the slow one, ~0.6 on AMX), and ``final_minutes`` for the rest:
    batch-norm re-estimation, calibration, report and registration. Both models follow a
    one-cycle schedule over their time limit (``schedule="timed"``), so a slower machine
    still ends annealed; a faster one stops after the epochs. The whole command is held to
    ``total_minutes``: the fracture model gets what generation and the router left of it
    (less its scoring passes and ``final_minutes``), at most ``fracture_max_minutes`` and
    at least ``fracture_min_minutes``.
    """

    seed: int = 20261122
    source_size: int = 512  # 384 before 2026-12-07: thin lines were lost to the sampling
    images: tuple[int, int, int] = (2400, 480, 800)  # train, val, test (patients)
    router_size: int = 128
    fracture_size: int = 512
    # half-width ResNet-10 since round 15: test accuracy 0.991-0.993 in 3 epochs, where the
    # full width (0.990-0.991 in 2) took twice the time (2026-12-08, AVX2: 75 s against 145 s)
    router_architecture: str = "resnet10-slim"
    fracture_architecture: str = "fracnet"
    router_epochs: int = 3
    # a maximum (100 until round 16, when 2 AMX cores reached it in 6.9 of their 7.5 minutes):
    # 2 idle cores manage ~12-21 epochs (AVX2) to ~105 (AMX); on a CPU the time decides
    fracture_epochs: int = 300
    fracture_crop: int = 128
    batch_size: int = 32
    learning_rate: float = 3e-3
    router_max_minutes: float = 1.5
    # 6.75 until round 15: the half-width router leaves a fast machine more of the 10 minutes
    fracture_max_minutes: float = 7.5
    fracture_min_minutes: float = 3.0
    total_minutes: float = 10.0  # the whole demo training, generation to the last report
    # after the fracture model's training, besides its measured scoring passes (before
    # round 12, 2026-12-07: a fixed 1.3 minutes for everything after training)
    final_minutes: float = 0.3
    localisation_weight: float = 3.0  # the mask loss against the line (1.0 before round 6)
    # > 0: the fracture model also learns the drawn anatomy per cell (FitConfig.anatomy_weight);
    # off: 0.930 over four demo runs with it against 0.929 without (round 14), +1 GB memory
    anatomy_weight: float = 0.0
    # validate only after the last epoch (0.8 before 2026-12-07: a validation pass cost
    # more than a crop epoch on an AVX2 CPU, and the annealed last epoch was kept anyway)
    fracture_validate_from: float = 1.0
    fracture_hard_negatives: float = 0.5  # of the crops off the line: on mined false alarms
    # > 0: draw more of the body parts whose crops the network finds hard (FitConfig.part_balance)
    fracture_part_balance: float = 0.0
    fracture_mirror: bool = True  # score each image with its mirror image (since round 12)
    # > 0: score in tiles of this many px (networks.FractureNet); off: +0.002 and +0.005
    # ROC-AUC with 320 px tiles on two networks (round 13) do not pay for 1.6x the passes
    fracture_tile: int = 0
    fracture_tile_margin: int = 0
    # > 0: also score each image turned by +/- this many degrees (FitConfig.rotation), when
    # the fracture model still trains rotation_min_minutes with their passes reserved (round
    # 16: +0.005 to +0.007 test ROC-AUC on each of three networks scored both ways, AMX)
    fracture_rotation: float = 6.0
    rotation_min_minutes: float = 6.0

    def fingerprint(self) -> str:
        """Identifies the synthetic data (same plan, same images)."""
        keys = ("seed", "source_size", "images", "router_size", "fracture_size")
        fields = {k: v for k, v in asdict(self).items() if k in keys}
        text = json.dumps({**fields, "generator": SYNTH_VERSION})
        return "synth:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def train_demo_models(
    settings: Settings, progress: bool = True, plan: DemoPlan | None = None
) -> list[ModelManifest]:
    """Train, evaluate and register the demo router and fracture model.

    Args:
        settings: where the registry and reports go (``MODEL_DIR``, ``DATA_DIR``).
        progress: show progress bars on stderr.
        plan: sizes and epochs (default: :class:`DemoPlan`, ~10 minutes on 2 CPU cores).

    Returns:
        The registered router and fracture model manifests.
    """
    plan = plan or DemoPlan()
    started = time.monotonic()
    router_params = PreprocessParams(input_size=plan.router_size)
    fracture_params = PreprocessParams(input_size=plan.fracture_size)
    with progress_bar(progress) as bar:
        router_sets: dict[str, ImageSet] = {}
        fracture_sets: dict[str, ImageSet] = {}
        with _generator_pool() as pool:
            for split, count in zip(("train", "val", "test"), plan.images, strict=True):
                router_sets[split], fracture_sets[split] = _make_split(
                    plan, split, count, router_params, fracture_params, bar, pool
                )
        extra = {"data": "boneflow synth (generated on the fly)", "demo_plan": asdict(plan)}
        data_report = {
            "source": "boneflow synth, held-out synthetic patients",
            "split_counts": {s: len(v) for s, v in router_sets.items()},
            "patients": {s: len(v) for s, v in router_sets.items()},
            "fingerprint": plan.fingerprint(),
        }
        router = TaskData(
            "router",
            BODY_PARTS,
            BODY_PARTS,
            router_sets["train"],
            router_sets["val"],
            router_sets["test"],
        )
        fracture = TaskData(
            "fracture",
            FRACTURE_LABELS,
            FRACTURE_PARTS,
            fracture_sets["train"],
            fracture_sets["val"],
            fracture_sets["test"],
        )
        manifests = []
        for name, data, task, params in (
            (ROUTER_NAME, router, "router", router_params),
            (FRACTURE_NAME, fracture, "fracture", fracture_params),
        ):
            config = _config(plan, task)
            if task == "fracture":
                config = _fracture_budget(plan, config, data, settings, started)
            manifests.append(
                train_and_register(
                    settings,
                    name,
                    data,
                    config,
                    params,
                    plan.fingerprint(),
                    {
                        **data_report,
                        "split_counts": {s: len(getattr(data, s)) for s in _SPLIT_KEYS},
                    },
                    bar=bar,
                    extra_training=extra,
                )
            )
    return manifests


def _fracture_budget(
    plan: DemoPlan, config: FitConfig, data: TaskData, settings: Settings, started: float
) -> FitConfig:
    """The fracture model's time limit, and whether this machine can afford rotated views.

    Its scoring passes (validation and test) are timed here first; with rotated views they
    cost three times as much, so the views are kept only when the fracture model still
    trains ``plan.rotation_min_minutes`` with them reserved (else one view: on a slow CPU
    the training time buys more).
    """
    device = resolve_device(settings.device)
    images = len(data.val) + len(data.test)

    def budget(config: FitConfig) -> tuple[float, float, float]:
        per_image = scoring_seconds(config, data.val, device)
        passes = per_image * images / 60
        spent = (time.monotonic() - started) / 60
        return fracture_minutes(plan, spent, passes), passes, per_image

    minutes, passes, per_image = budget(config)
    if config.rotation and minutes < plan.rotation_min_minutes:
        log.info(
            "fracture model: rotated views would leave %.2f min to train (< %.2f): one view",
            minutes,
            plan.rotation_min_minutes,
        )
        config = replace(config, rotation=0.0)
        minutes, passes, per_image = budget(config)
    log.info(
        "fracture model: %.2f min to train, %.2f min reserved for its scoring passes "
        "(%.0f ms per image%s)",
        minutes,
        passes,
        per_image * 1000,
        f", with views turned by +/-{config.rotation:g} degrees" if config.rotation else "",
    )
    return replace(config, max_minutes=minutes)


def fracture_minutes(plan: DemoPlan, spent_minutes: float, passes_minutes: float = 0.0) -> float:
    """The fracture model's time limit once ``spent_minutes`` of the demo have passed.

    What is left of ``plan.total_minutes`` after its scoring passes (``passes_minutes``, as
    measured) and ``plan.final_minutes``, clamped to the plan's minimum and maximum: a
    slow machine (or a busy one) shortens the fracture model's training rather than the
    command running long, a fast one keeps the full limit.
    """
    left = plan.total_minutes - spent_minutes - plan.final_minutes - passes_minutes
    return round(min(plan.fracture_max_minutes, max(plan.fracture_min_minutes, left)), 2)


def demo_test_set(
    manifest: ModelManifest, params: PreprocessParams, bar: ProgressBar | None = None
) -> ImageSet:
    """The demo's held-out synthetic test set, preprocessed for ``manifest``'s model."""
    raw = manifest.training.get("demo_plan")
    plan = DemoPlan(**{**asdict(DemoPlan()), **raw}) if isinstance(raw, dict) else DemoPlan()
    plan = DemoPlan(**{**asdict(plan), "images": tuple(plan.images)})
    with _generator_pool() as pool:
        router, fracture = _make_split(
            plan, "test", plan.images[2], params, params, bar or ProgressBar(None), pool
        )
    return router if manifest.task == "router" else fracture


def patient_rng(seed: int, split: str, patient: int) -> np.random.Generator:
    """The random stream of one synthetic patient (disjoint across splits)."""
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_KEYS[split], patient]))


# ---- helpers ----------------------------------------------------------------------------


def _make_split(
    plan: DemoPlan,
    split: str,
    count: int,
    router_params: PreprocessParams,
    fracture_params: PreprocessParams,
    bar: ProgressBar,
    pool: Executor | None = None,
    chunk: int = 128,
) -> tuple[ImageSet, ImageSet]:
    """Generate ``count`` patients (one image each) and preprocess them for both models.

    Works in chunks so that only a few chunks of full-size images are in memory at a time,
    spread over ``pool`` when given (each patient is its own random stream, so the images
    do not depend on how many processes made them).
    """
    advance = bar.stage(f"synthetic {split} images", count)
    chunks = [range(start, min(start + chunk, count)) for start in range(0, count, chunk)]
    routers: list[ImageSet] = []
    fractures: list[ImageSet] = []
    args = (router_params, fracture_params)
    if pool is None:
        done: Iterable[tuple[ImageSet, ImageSet]] = (
            _make_chunk(plan, split, c, *args) for c in chunks
        )
    else:  # submitted all at once, collected in order: the sets keep patient order
        futures = [pool.submit(_make_chunk, plan, split, c, *args) for c in chunks]
        done = (future.result() for future in futures)
    for router, fracture in done:
        routers.append(router)
        fractures.append(fracture)
        advance(len(router))
    return _concatenate(routers), _concatenate(fractures)


@contextmanager
def _generator_pool() -> Iterator[Executor | None]:
    """One process per CPU core for image generation (None on a single core).

    Spawned, not forked: the parent may already run torch's thread pool.
    """
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if workers <= 1:
        yield None
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, initializer=_one_thread) as pool:
        yield pool


def _one_thread() -> None:
    """A generator process uses one core: the pool is the parallelism."""
    import cv2

    cv2.setNumThreads(1)


def _make_chunk(
    plan: DemoPlan,
    split: str,
    patients: range,
    router_params: PreprocessParams,
    fracture_params: PreprocessParams,
) -> tuple[ImageSet, ImageSet]:
    from boneflow.training.synth import generate_image, to_display

    images: list[npt.NDArray[np.float32]] = []
    parts: list[str] = []
    fractured: list[bool] = []
    tiers: list[str] = []
    types: list[str] = []
    segments: list[tuple[float, float, float, float] | None] = []
    # the anatomy maps are a training-only target: kept for training images when asked for
    keep_anatomy = split == "train" and plan.anatomy_weight > 0
    anatomy: list[npt.NDArray[np.uint8] | None] = []
    for i in patients:
        rng = patient_rng(plan.seed, split, i)
        part = BODY_PARTS[i % len(BODY_PARTS)]
        broken = part != "other" and bool(rng.random() < 0.5)
        image = generate_image(rng, part, broken, plan.source_size)
        images.append(to_display(image))
        parts.append(part)
        fractured.append(bool(image.fractured))
        tiers.append(str(image.difficulty))
        types.append(image.fracture_type or "none")
        segments.append(image.fracture_segment)
        anatomy.append(image.anatomy if keep_anatomy else None)
    router = build_image_set(
        images, [BODY_PARTS.index(p) for p in parts], router_params, parts, tiers
    )
    limb = [i for i, p in enumerate(parts) if p != "other"]
    fracture = build_image_set(
        [images[i] for i in limb],
        [int(fractured[i]) for i in limb],
        fracture_params,
        [parts[i] for i in limb],
        [tiers[i] for i in limb],
        segments=[segments[i] for i in limb],
        fracture_types=[types[i] for i in limb],
        anatomy=[anatomy[i] for i in limb] if keep_anatomy else None,
    )
    return router, fracture


def _concatenate(sets: list[ImageSet]) -> ImageSet:
    masks = [s.masks for s in sets if s.masks is not None]
    anatomy = [s.anatomy for s in sets if s.anatomy is not None]
    return ImageSet(
        images=np.concatenate([s.images for s in sets]),
        labels=np.concatenate([s.labels for s in sets]),
        body_parts=tuple(p for s in sets for p in s.body_parts),
        difficulties=tuple(d for s in sets for d in s.difficulties),
        masks=np.concatenate(masks) if len(masks) == len(sets) else None,
        anatomy=np.concatenate(anatomy) if sets and len(anatomy) == len(sets) else None,
        fracture_types=(
            tuple(t for s in sets for t in s.fracture_types)
            if all(len(s.fracture_types) == len(s) for s in sets)
            else ()
        ),
    )


def _config(plan: DemoPlan, task: str) -> FitConfig:
    router = task == "router"
    return FitConfig(
        architecture=plan.router_architecture if router else plan.fracture_architecture,
        num_classes=len(BODY_PARTS) if router else 2,
        epochs=plan.router_epochs if router else plan.fracture_epochs,
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        optimizer="adamw",
        loss="focal" if router else "weighted-ce",
        seed=plan.seed,
        early_stop_patience=100,  # one-cycle schedule: the last epochs are the best
        schedule="timed",
        validate_from=0.0 if router else plan.fracture_validate_from,
        localisation_weight=0.0 if router else plan.localisation_weight,
        anatomy_weight=0.0 if router else plan.anatomy_weight,
        crop_size=0 if router else plan.fracture_crop,
        hard_negatives=0.0 if router else plan.fracture_hard_negatives,
        part_balance=0.0 if router else plan.fracture_part_balance,
        mirror=not router and plan.fracture_mirror,
        tile=0 if router else plan.fracture_tile,
        tile_margin=0 if router else plan.fracture_tile_margin,
        rotation=0.0 if router else plan.fracture_rotation,
        max_minutes=plan.router_max_minutes if router else plan.fracture_max_minutes,
        monitor="accuracy" if router else "auc",
    )
