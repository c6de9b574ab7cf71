"""``boneflow train``: data set -> router and fracture model -> report -> registry.

One function trains and registers one model from three preprocessed splits
(:func:`train_and_register`); :func:`train_command` feeds it from a data set on disk and
:func:`boneflow.training.demo.train_demo_models` from synthetic radiographs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from boneflow.config import Settings
from boneflow.findings import BODY_PARTS
from boneflow.models.networks import (
    check_rotation,
    check_tiles,
    evidence_layer,
    supports_mirror,
    supports_rotation,
    supports_tiles,
)
from boneflow.models.registry import (
    FRACTURE_LABELS,
    LoadedModel,
    ModelManifest,
    Registry,
    calibrated,
)
from boneflow.models.transforms import PreprocessParams
from boneflow.training.datasets import (
    DatasetError,
    PreparedDataset,
    Record,
    load_records,
    prepare_dataset,
    read_image,
)
from boneflow.training.engine import (
    FitConfig,
    ImageSet,
    build_image_set,
    fit,
    mixed_precision_dtype,
    predict,
    resolve_device,
)
from boneflow.training.evaluate import (
    TARGET_SENSITIVITY,
    Evaluation,
    evaluate_predictions,
    summary,
)
from boneflow.training.metrics import (
    calibration,
    choose_threshold,
    fit_part_platt,
    fit_platt,
)
from boneflow.training.options import EvaluateOptions, TrainOptions
from boneflow.training.report import write_report

log = logging.getLogger(__name__)
T = TypeVar("T")

# Defaults chosen by measured speed and accuracy on CPU (see docs/models.md): a ResNet-18
# with stride-2 stem for the router (22 ms per 224 px image), DenseNet-121 for fractures
# (MURA's reference family; 49 ms per image, better on fine cortical detail).
DEFAULT_ARCHITECTURE: dict[str, str] = {"router": "resnet18", "fracture": "densenet121"}
DEFAULT_EPOCHS: dict[str, int] = {"router": 30, "fracture": 50}
DEFAULT_LEARNING_RATE: dict[str, float] = {"sgd": 0.01, "adamw": 1e-3}
ROUTER_ACCEPTED_SHARE = 0.99  # router threshold keeps this share of correct val answers


@dataclass(frozen=True)
class TaskData:
    """The three preprocessed splits of one task and what they cover."""

    task: str  # "router" or "fracture"
    class_names: tuple[str, ...]
    body_parts: tuple[str, ...]
    train: ImageSet
    val: ImageSet
    test: ImageSet


def train_command(settings: Settings, options: TrainOptions) -> int:
    """``boneflow train``: train, evaluate, report and register; prints one JSON line each."""
    if options.demo:
        from boneflow.training.demo import train_demo_models

        manifests = train_demo_models(settings, progress=True)
    else:
        manifests = train_dataset(settings, options)
    for manifest in manifests:
        print(json.dumps({"model": manifest.model_id, **_headline(manifest)}))
    return 0


def train_dataset(settings: Settings, options: TrainOptions) -> list[ModelManifest]:
    """Train the requested task(s) on a data set on disk.

    Raises:
        DatasetError: no ``--data``, or the data cannot train the task.
    """
    if options.data is None:
        raise DatasetError("--data is required (or use --demo for synthetic demo models)")
    params = PreprocessParams(input_size=options.image_size)
    with progress_bar(True) as bar:
        records = load_records(options.dataset_format, options.data)
        prepared = prepare_dataset(
            records,
            source=f"{options.dataset_format}:{options.data.name}",
            seed=options.seed,
            progress=lambda items, total: bar.iterate(items, "checking images", total),
        )
        tasks = ["router", "fracture"] if options.task == "all" else [options.task]
        manifests = []
        for task in tasks:
            data = task_data(prepared, task, params, bar)
            name = "router" if task == "router" else f"fracture-{options.dataset_format}"
            config = fit_config(options, task, len(data.class_names), data.train.masks is not None)
            manifests.append(
                train_and_register(
                    settings,
                    name,
                    data,
                    config,
                    params,
                    prepared.report.fingerprint,
                    prepared.report.to_dict(),
                    options.version,
                    options.report_dir,
                    options.resume,
                    bar,
                )
            )
    return manifests


def fit_config(
    options: TrainOptions, task: str, num_classes: int, located: bool = False
) -> FitConfig:
    """Hyper-parameters from the options, with the task's measured defaults.

    ``located``: the training images carry fracture masks (synth data), which the fracture
    model learns from as a training-only aid (``localisation_weight``, default 1.0) and
    which crop training (``crop_size``) needs.

    Raises:
        DatasetError: crops asked for without fracture locations or with a network that
            cannot score a whole image after training on crops; mirror or tiled scoring
            asked for with a network that cannot do it, or tiles off FractureNet's grid;
            rotated views with a network that cannot score them, or a turn over 45 degrees.
    """
    architecture = options.architecture or DEFAULT_ARCHITECTURE[task]
    crop_size = options.crop_size if task == "fracture" else 0
    if crop_size > 0 and not located:
        raise DatasetError("--crop needs fracture locations (boneflow synth labels.csv)")
    if crop_size > 0 and evidence_layer(architecture) is None:
        raise DatasetError(
            f"--crop needs a fully-convolutional network with an evidence map (fracnet), "
            f"not {architecture}"
        )
    mirror = options.mirror and task == "fracture"
    if mirror and not supports_mirror(architecture):
        raise DatasetError(
            f"--mirror needs a network that can score mirror images (fracnet), not {architecture}"
        )
    tile = options.tile if task == "fracture" else 0
    margin = options.tile_margin if tile else 0
    if tile and not supports_tiles(architecture):
        raise DatasetError(
            f"--tile needs a network that can score in tiles (fracnet), not {architecture}"
        )
    try:
        check_tiles(tile, margin)
    except ValueError as exc:
        raise DatasetError(f"--tile {tile} --tile-margin {margin}: {exc}") from None
    rotation = options.rotation if task == "fracture" else 0.0
    if rotation and not supports_rotation(architecture):
        raise DatasetError(
            f"--rotation needs a network that can score rotated views (fracnet), not {architecture}"
        )
    try:
        check_rotation(rotation)
    except ValueError as exc:
        raise DatasetError(f"--rotation {rotation}: {exc}") from None
    weight = options.localisation_weight
    if weight is None:
        weight = 1.0 if located else 0.0
    return FitConfig(
        architecture=architecture,
        num_classes=num_classes,
        epochs=options.epochs or DEFAULT_EPOCHS[task],
        batch_size=options.batch_size,
        learning_rate=options.learning_rate or DEFAULT_LEARNING_RATE[options.optimizer],
        optimizer=options.optimizer,
        loss=options.loss,
        seed=options.seed,
        max_minutes=options.max_minutes,
        monitor="auc" if task == "fracture" else "accuracy",
        localisation_weight=weight if task == "fracture" and located else 0.0,
        crop_size=crop_size,
        mirror=mirror,
        tile=tile,
        tile_margin=margin,
        rotation=rotation,
    )


def task_data(
    prepared: PreparedDataset, task: str, params: PreprocessParams, bar: ProgressBar
) -> TaskData:
    """Select and preprocess the records one task trains on.

    The router learns the body parts present in the data (in :data:`BODY_PARTS` order); the
    fracture model learns every record with a fracture label outside ``other``.

    Raises:
        DatasetError: a split is empty or the task has fewer than two classes.
    """
    usable = [r for r in prepared.records if _label(r, task, ()) is not None]
    if task == "router":
        names = tuple(p for p in BODY_PARTS if any(r.body_part == p for r in usable))
        covered = names
    else:
        names = FRACTURE_LABELS
        covered = tuple(p for p in BODY_PARTS if any(r.body_part == p for r in usable))
    if len(names) < 2:
        raise DatasetError(f"the data set has fewer than two {task} classes")
    # Fracture lines (synth data) become masks the fracture model can learn from.
    located = task == "fracture" and any(r.fracture_segment is not None for r in usable)
    splits = {}
    for split in ("train", "val", "test"):
        chosen = [r for r in usable if r.split == split]
        labels = [_label(r, task, names) for r in chosen]
        if not chosen:
            raise DatasetError(f"the {split} split has no image for the {task} task")
        advance = bar.stage(f"{task}: preprocessing {split}", len(chosen))
        splits[split] = build_image_set(
            lambda i, chosen=chosen: read_image(chosen[i]),  # type: ignore[misc]
            [int(v) for v in labels if v is not None],
            params,
            [r.body_part or "unknown" for r in chosen],
            [r.difficulty or ("unknown" if r.fractured else "none") for r in chosen],
            progress=advance,
            segments=[r.fracture_segment for r in chosen] if located else None,
            fracture_types=_fracture_types(chosen),
        )
    return TaskData(task, names, covered, splits["train"], splits["val"], splits["test"])


def train_and_register(
    settings: Settings,
    name: str,
    data: TaskData,
    config: FitConfig,
    params: PreprocessParams,
    fingerprint: str,
    data_report: Mapping[str, object],
    version: str | None = None,
    report_root: Path | None = None,
    resume: bool = False,
    bar: ProgressBar | None = None,
    extra_training: Mapping[str, object] | None = None,
) -> ModelManifest:
    """Fit, choose the operating threshold on validation, test, report and register."""
    bar = bar or ProgressBar(None)
    registry = Registry(settings.resolved_model_dir)
    version = version or registry.next_version(name)
    run_dir = settings.data_dir / "runs" / name
    device = resolve_device(settings.device)
    batches = -(-len(data.train) // config.batch_size) * config.epochs
    seconds = config.max_minutes * 60 if config.max_minutes else None
    step, finish = bar.training_stage(f"{name}: training {config.architecture}", batches, seconds)
    result = fit(
        config,
        data.train,
        data.val,
        run_dir,
        device,
        resume=resume,
        on_epoch=lambda line: log.info("%s epoch %s", name, _short(line)),
        on_batch=step,
    )
    finish()
    val_probs = result.val_probabilities  # the kept epoch's, when fit computed them alike
    if val_probs is None:
        val_probs = predict(result.network, data.val, device, config.batch_size)
    test_probs = predict(result.network, data.test, device, config.batch_size)
    scaling: dict[str, float] = {}
    by_part: dict[str, dict[str, float]] = {}
    if data.task == "fracture":
        uncalibrated_ece, _ = calibration(data.test.labels, test_probs[:, 1])
        scale, offset = fit_platt(data.val.labels, val_probs[:, 1])
        scaling = {"scale": scale, "offset": offset}
        if len(data.body_parts) > 1:  # one model, several parts: each on its own scale
            by_part = fit_part_platt(data.val.labels, val_probs[:, 1], data.val.body_parts, scaling)
        val_probs = _binary(calibrated(val_probs[:, 1], data.val.body_parts, scaling, by_part))
        test_probs = _binary(calibrated(test_probs[:, 1], data.test.body_parts, scaling, by_part))
        threshold = choose_threshold(data.val.labels, val_probs[:, 1], TARGET_SENSITIVITY)
    else:
        threshold = router_threshold(data.val.labels, val_probs)
    evaluation = evaluate_predictions(
        data.task,
        data.class_names,
        data.test.labels,
        test_probs,
        data.test.body_parts,
        data.test.difficulties,
        threshold,
        data.test.fracture_types,
    )
    if scaling:  # what the reliability of the network's own probabilities was
        evaluation.metrics["ece_uncalibrated"] = uncalibrated_ece
    training = {
        **config.to_dict(),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped": result.stopped,
        "train_seconds": round(result.seconds, 1),
        "device": str(device),
        "autocast": str(mixed_precision_dtype(device, config.mixed_precision) or "none"),
        "target_sensitivity": TARGET_SENSITIVITY,
        "images": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        **dict(extra_training or {}),
    }
    manifest = ModelManifest(
        name=name,
        version=version,
        task="router" if data.task == "router" else "fracture",
        architecture=config.architecture,
        labels=data.class_names,
        body_parts=data.body_parts,
        input_size=params.input_size,
        preprocessing=params.to_dict(),
        threshold=float(threshold),
        calibration=scaling,
        calibration_by_part=by_part,
        mirror=config.mirror,
        tile=config.tile,
        tile_margin=config.tile_margin,
        rotation=config.rotation,
        metrics={**summary(evaluation), "test_n": len(data.test)},
        data_fingerprint=fingerprint,
        training=training,
    )
    registered = registry.register(result.network, manifest)
    folder = (report_root or settings.data_dir / "reports") / f"{name}-{version}"
    write_report(folder, evaluation, result.history, registered.to_dict(), data_report)
    log.info("registered %s; report in %s", registered.model_id, folder)
    return registered


def _fracture_types(records: Sequence[Record]) -> list[str] | None:
    """Per record its fracture type ("none" if not fractured), when the data set names any."""
    if not any(r.fracture_type for r in records):
        return None
    return [r.fracture_type or ("unknown" if r.fractured else "none") for r in records]


def _binary(positive: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """N x 2 probabilities ``[1 - p, p]`` from P(positive)."""
    p = np.asarray(positive, dtype=np.float32)
    return np.stack([1.0 - p, p], axis=1).astype(np.float32)


def router_threshold(labels: npt.ArrayLike, probabilities: npt.ArrayLike) -> float:
    """Lowest confidence that still accepts :data:`ROUTER_ACCEPTED_SHARE` of correct answers.

    Clamped to 0.3..0.9 so that a tiny validation set cannot make the router accept noise
    or refuse everything.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    confidences = np.sort(probs.max(axis=1)[correct])
    if confidences.size == 0:
        return 0.5
    index = int((1.0 - ROUTER_ACCEPTED_SHARE) * confidences.size)
    return float(np.clip(confidences[index], 0.3, 0.9))


def evaluate_registered(
    settings: Settings, loaded: LoadedModel, options: EvaluateOptions
) -> Evaluation:
    """Run a registered model on a data set split (or the demo's held-out synthetic set)."""
    manifest = loaded.manifest
    params = PreprocessParams.from_dict(manifest.preprocessing)
    device = resolve_device(settings.device)
    with progress_bar(True) as bar:
        if options.data is None:
            from boneflow.training.demo import demo_test_set

            images = demo_test_set(manifest, params, bar)
        else:
            records = load_records(options.dataset_format, options.data)
            seed = int(manifest.training.get("seed", 0))
            prepared = prepare_dataset(records, options.dataset_format, seed=seed)
            chosen = [
                r
                for r in prepared.split(options.split)
                if _label(r, manifest.task, manifest.labels) is not None
            ]
            if not chosen:
                raise DatasetError(f"no usable image in split {options.split!r} of {options.data}")
            images = build_image_set(
                lambda i: read_image(chosen[i]),
                [int(_label(r, manifest.task, manifest.labels) or 0) for r in chosen],
                params,
                [r.body_part or "unknown" for r in chosen],
                [r.difficulty or ("unknown" if r.fractured else "none") for r in chosen],
                progress=bar.stage("preprocessing", len(chosen)),
                fracture_types=_fracture_types(chosen),
            )
    network = loaded.network.to(device)
    probs = predict(network, images, device, options.batch_size)
    if manifest.task == "fracture":  # the reported probability: the manifest's calibration
        probs = _binary(manifest.fracture_probability(probs[:, 1], images.body_parts))
    return evaluate_predictions(
        manifest.task,
        manifest.labels,
        images.labels,
        probs,
        images.body_parts,
        images.difficulties,
        manifest.threshold,
        images.fracture_types,
    )


# ---- progress ---------------------------------------------------------------------------


class ProgressBar:
    """A thin wrapper over rich's progress display; silent when given no display."""

    def __init__(self, progress: object | None) -> None:
        self._progress = progress

    def stage(self, description: str, total: int) -> Callable[[int], None]:
        """Start a stage; returns a function that advances it."""
        if self._progress is None:
            return lambda _n: None
        task_id = self._progress.add_task(description, total=total)  # type: ignore[attr-defined]
        return lambda n: self._progress.advance(task_id, n)  # type: ignore[union-attr]

    def training_stage(
        self,
        description: str,
        batches: int,
        seconds: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> tuple[Callable[[], None], Callable[[], None]]:
        """A training stage: ``(step, finish)``, called after each batch and at the end.

        With a time limit the bar shows the larger of the batch share and the time share
        (a timed run usually stops by the clock, long before its maximum of epochs), so it
        neither stalls half-way nor promises minutes that will not be spent; ``finish``
        fills it when training ends early.
        """
        if self._progress is None:
            return (lambda: None), (lambda: None)
        progress = self._progress
        task_id = progress.add_task(description, total=batches)  # type: ignore[attr-defined]
        started, done = clock(), 0

        def step() -> None:
            nonlocal done
            done += 1
            share = done / batches
            if seconds:
                share = max(share, (clock() - started) / seconds)
            progress.update(task_id, completed=min(share, 1.0) * batches)  # type: ignore[attr-defined]

        def finish() -> None:
            progress.update(task_id, completed=batches)  # type: ignore[attr-defined]

        return step, finish

    def iterate(self, items: Iterable[T], description: str, total: int) -> Iterator[T]:
        """Iterate over items while advancing a stage."""
        advance = self.stage(description, total)
        for item in items:
            yield item
            advance(1)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[ProgressBar]:
    """A live progress display on stderr (when enabled)."""
    if not enabled:
        yield ProgressBar(None)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        yield ProgressBar(progress)


# ---- helpers ----------------------------------------------------------------------------


def _label(record: Record, task: str, names: Sequence[str]) -> int | None:
    if task == "router":
        if record.body_part is None:
            return None
        if not names:
            return 0
        return names.index(record.body_part) if record.body_part in names else None
    if record.fractured is None or record.body_part == "other":
        return None
    return int(record.fractured)


def _headline(manifest: ModelManifest) -> dict[str, object]:
    keys = ("accuracy", "roc_auc", "roc_auc_hard", "sensitivity", "specificity")
    return {
        "threshold": round(manifest.threshold, 4),
        **{k: manifest.metrics[k] for k in keys if k in manifest.metrics},
    }


def _short(line: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in line.items())
