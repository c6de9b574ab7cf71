"""The training loop: batches of preprocessed images, augmentation, loss, optimiser, checkpoints.

Images are preprocessed once (:func:`boneflow.models.transforms.preprocess`, the same
definition inference uses) into a ``uint8`` cache, so that each epoch only augments and
trains. Augmentation (rotation, zoom, shift, left-right flip, gamma, noise) runs on whole
batches in torch. Every epoch writes one JSON line and a checkpoint that ``resume`` continues
from; the best epoch on validation is kept.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from boneflow.models.networks import (
    build_network,
    evidence_layer,
    gradcam_layer,
    scoring_batch,
    set_mirror,
    set_rotation,
    set_tiles,
    single_pass,
)
from boneflow.models.transforms import Geometry, PreprocessParams, preprocess

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
EPOCH_LOG = "epochs.jsonl"


@dataclass(frozen=True, slots=True)
class ImageSet:
    """Preprocessed images (``uint8``, N x S x S) with labels and grouping for evaluation."""

    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]
    body_parts: tuple[str, ...]
    difficulties: tuple[str, ...]
    masks: npt.NDArray[np.uint8] | None = None  # N x S x S, 255 on the fracture line (synth)
    fracture_types: tuple[str, ...] = ()  # per image ("none" for negatives), when the data say
    # N x S x S class ids of synth_raster.ANATOMY_CLASSES (synth; training-only target)
    anatomy: npt.NDArray[np.uint8] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True, slots=True)
class FitConfig:
    """Hyper-parameters of one training run (all recorded in the manifest)."""

    architecture: str
    num_classes: int
    epochs: int
    batch_size: int = 32
    learning_rate: float = 0.01
    optimizer: str = "sgd"  # sgd (momentum 0.9, weight decay 1e-4) or adamw
    loss: str = "focal"  # focal (gamma 2, class-weighted) or weighted-ce
    seed: int = 0
    plateau_patience: int = 5
    early_stop_patience: int = 10
    max_minutes: float | None = None
    augment: bool = True
    monitor: str = "auc"  # auc (binary) or accuracy
    # plateau (ReduceLROnPlateau), cosine (one cycle over the epochs) or timed (one cycle
    # over max_minutes: a run the clock stops still ends annealed; epochs is then a maximum)
    schedule: str = "plateau"
    validate_from: float = 0.0  # share of the run before which epochs skip validation
    localisation_weight: float = 0.0  # > 0: also learn where the fracture is (needs masks)
    # > 0: also learn, per cell, bone / overlapping bones / growth plate or canal (needs the
    # synthetic anatomy maps; a training-only head on the Grad-CAM layer)
    anatomy_weight: float = 0.0
    crop_size: int = 0  # > 0: train on crops (needs masks, a fully-convolutional network)
    hard_negatives: float = 0.3  # crops: share of the non-line crops on mined false alarms
    # > 0: each epoch draws its training images by body part, this share of the draws in
    # proportion to each part's mean training loss of the epoch before (_PartBalance)
    part_balance: float = 0.0
    # validate (and register) scoring each image with its mirror image (fracnet only)
    mirror: bool = False
    # > 0: validate (and register) scoring whole images in tiles of this many px, each
    # cell keeping tile_margin px of context (fracnet only; networks.FractureNet)
    tile: int = 0
    tile_margin: int = 0
    # > 0: validate (and register) scoring each image also turned by +/- this many degrees,
    # averaging the three log-odds (fracnet only; networks.FractureNet)
    rotation: float = 0.0
    # float16 autocast on CUDA, bfloat16 on a CPU with native bf16 (AVX-512 BF16 or AMX);
    # weights, optimiser and loss stay float32. Elsewhere it has no effect.
    mixed_precision: bool = True

    def to_dict(self) -> dict[str, object]:
        """JSON-ready hyper-parameters."""
        return asdict(self)


@dataclass(frozen=True)
class FitResult:
    """The trained network (weights of the best epoch) and how training went."""

    network: nn.Module
    history: tuple[dict[str, float], ...]
    best_epoch: int
    stopped: str  # "epochs", "early-stopping" or "time-limit"
    seconds: float
    # the kept epoch's validation probabilities when they were computed as predict()
    # computes them (no training-only autocast), so the final pass need not run again
    val_probabilities: npt.NDArray[np.float32] | None = None


def build_image_set(
    images: Sequence[npt.NDArray[np.float32]] | Callable[[int], npt.NDArray[np.float32]],
    labels: Sequence[int],
    params: PreprocessParams,
    body_parts: Sequence[str],
    difficulties: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    segments: Sequence[tuple[float, float, float, float] | None] | None = None,
    fracture_types: Sequence[str] | None = None,
    anatomy: Sequence[npt.NDArray[np.uint8] | None] | None = None,
) -> ImageSet:
    """Preprocess every image once into a ``uint8`` cache.

    Args:
        images: display-ready float images (bone bright), or a function returning image i.
        labels: class index of each image.
        params: the model's preprocessing parameters.
        body_parts: body part of each image (for per-part metrics).
        difficulties: fracture difficulty of each image, if known.
        progress: called with the number of images just done.
        segments: per image, the fracture line ``(x0, y0, x1, y1)`` in source pixels (or
            None); drawn into ``masks`` on the network input's grid.
        fracture_types: fracture type of each image ("none" for negatives), if known (for
            per-type metrics).
        anatomy: per image, its class map on the source grid (``SynthImage.anatomy``);
            carried onto the network input's grid (nearest neighbour) as ``anatomy``.
    """
    count = len(labels)
    size = params.input_size
    cache = np.zeros((count, size, size), dtype=np.uint8)
    masks = np.zeros((count, size, size), dtype=np.uint8) if segments is not None else None
    classes = np.zeros((count, size, size), dtype=np.uint8) if anatomy is not None else None
    for i in range(count):
        image = images(i) if callable(images) else images[i]
        tensor, geometry = preprocess(image, params)
        cache[i] = np.rint(tensor[0] * 255.0).astype(np.uint8)
        segment = segments[i] if segments is not None else None
        if masks is not None and segment is not None:
            _draw_segment(masks[i], segment, geometry)
        source = anatomy[i] if anatomy is not None else None
        if classes is not None and source is not None:
            _place_classes(classes[i], source, geometry)
        if progress is not None:
            progress(1)
    return ImageSet(
        images=cache,
        labels=np.asarray(labels, dtype=np.int64),
        body_parts=tuple(body_parts),
        difficulties=tuple(difficulties or ["none"] * count),
        masks=masks,
        fracture_types=tuple(fracture_types or ()),
        anatomy=classes,
    )


def fit(
    config: FitConfig,
    train: ImageSet,
    val: ImageSet,
    run_dir: Path,
    device: torch.device,
    resume: bool = False,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_batch: Callable[[], None] | None = None,
) -> FitResult:
    """Train a network; keep the epoch with the best validation metric.

    Args:
        config: hyper-parameters.
        train: training images; val: validation images (model selection, LR schedule).
        run_dir: checkpoint and per-epoch JSON lines go here.
        device: where to train (mixed precision and channels-last on CUDA and on CPUs with
            native bfloat16, see :func:`mixed_precision_dtype`).
        resume: continue from ``run_dir/checkpoint.pt`` when it exists.
        on_epoch: called with each epoch's log line; on_batch: after every batch.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    network = build_network(config.architecture, config.num_classes).to(device)
    set_mirror(network, config.mirror)  # eval mode only: validation, not training
    set_tiles(network, config.tile, config.tile_margin)  # the same
    set_rotation(network, config.rotation)  # the same
    cuda = device.type == "cuda"
    amp = mixed_precision_dtype(device, config.mixed_precision)
    if channels_last(device, amp):  # the layout the fast kernels want
        network = network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    localiser = _Localiser(network, config, train, device)
    anatomist = _Anatomist(network, config, train, device)
    cropper = _Cropper.create(train, config)
    balance = _PartBalance(train.body_parts, config.part_balance)
    optimizer = _optimizer(config, network, localiser.head, anatomist.head)
    scheduler = _scheduler(config, optimizer, len(train))
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp is torch.float16)
    weights = class_weights(train.labels, config.num_classes).to(device)
    history: list[dict[str, float]] = []
    best_score, best_epoch, bad_epochs, start_epoch = -math.inf, 0, 0, 0
    best_state = _state_copy(network)
    best_probs: npt.NDArray[np.float32] | None = None
    as_predicted = (amp or _predict_dtype(device)) == _predict_dtype(device)
    generator = torch.Generator().manual_seed(config.seed)
    checkpoint_path = run_dir / CHECKPOINT
    if resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        best_state = state["best_model"]
        if localiser.head is not None and "localiser" in state:
            localiser.head.load_state_dict(state["localiser"])
        if anatomist.head is not None and "anatomist" in state:
            anatomist.head.load_state_dict(state["anatomist"])
        if "part_weights" in state:
            balance.load_state_dict(state["part_weights"])
        history = [dict(h) for h in state["history"]]
        best_score, best_epoch = float(state["best_score"]), int(state["best_epoch"])
        bad_epochs, start_epoch = int(state["bad_epochs"]), int(state["epoch"])
        log.info("resuming %s at epoch %d", run_dir, start_epoch + 1)
    elif (run_dir / EPOCH_LOG).exists():
        (run_dir / EPOCH_LOG).unlink()
    started = time.monotonic()
    stopped = "epochs"
    for epoch in range(start_epoch, config.epochs):
        epoch_started = time.monotonic()
        train_loss = _train_epoch(
            network,
            optimizer,
            scheduler,
            scaler,
            train,
            config,
            weights,
            generator,
            device,
            on_batch,
            localiser,
            cropper,
            amp,
            anatomist,
            balance,
        )
        balance.update()
        out_of_time = (
            isinstance(scheduler, _TimedOneCycle)
            and scheduler.ends_before(time.monotonic() - epoch_started)
        ) or (
            config.max_minutes is not None and time.monotonic() - started > config.max_minutes * 60
        )
        last = out_of_time or epoch + 1 == config.epochs
        if cropper is not None and not last:  # the next epoch's hard negatives
            cropper.mine(network, localiser, device, amp, balance.probabilities())
        line = {
            "epoch": float(epoch + 1),
            "train_loss": train_loss,
            "learning_rate": float(optimizer.param_groups[0]["lr"]),
        }
        if balance.active:  # the next epoch's draw
            line.update({f"weight_{k}": round(v, 3) for k, v in balance.state_dict().items()})
        if last or _progress(scheduler, epoch, config) >= config.validate_from:
            recalibrate_batchnorm(
                network, train if cropper is None else cropper.sample(), device, config.batch_size
            )
            # the last validation runs as predict() runs (no training-only autocast): its
            # probabilities are then the final pass's, which need not run again
            val_probs = predict(network, val, device, config.batch_size, None if last else amp)
            val_loss = float(
                F.nll_loss(
                    torch.log(torch.from_numpy(val_probs).clamp_min(1e-7)),
                    torch.from_numpy(val.labels),
                )
            )
            score = _score(config.monitor, val.labels, val_probs)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val_loss)
            line["val_loss"] = val_loss
            line[f"val_{config.monitor}"] = score
            line["val_accuracy"] = float((val_probs.argmax(1) == val.labels).mean())
            if score > best_score:
                best_score, best_epoch, bad_epochs = score, epoch + 1, 0
                best_state = _state_copy(network)
                best_probs = val_probs if last or as_predicted else None
            else:
                bad_epochs += 1
        line["seconds"] = time.monotonic() - epoch_started
        history.append(line)
        with (run_dir / EPOCH_LOG).open("a") as handle:
            handle.write(json.dumps(line) + "\n")
        torch.save(
            {
                "model": network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "best_model": best_state,
                "history": history,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "epoch": epoch + 1,
                **({"localiser": localiser.head.state_dict()} if localiser.head else {}),
                **({"anatomist": anatomist.head.state_dict()} if anatomist.head else {}),
                "part_weights": balance.state_dict(),
            },
            checkpoint_path,
        )
        if on_epoch is not None:
            on_epoch(line)
        if out_of_time:
            stopped = "time-limit"
            break
        if bad_epochs >= config.early_stop_patience:
            stopped = "early-stopping"
            break
    localiser.close()
    anatomist.close()
    network.load_state_dict(best_state)
    network.eval()
    seconds = time.monotonic() - started
    return FitResult(network, tuple(history), best_epoch, stopped, seconds, best_probs)


def predict(
    network: nn.Module,
    images: ImageSet,
    device: torch.device,
    batch_size: int = 64,
    amp: torch.dtype | None = None,
) -> npt.NDArray[np.float32]:
    """Class probabilities (N x classes) of every image.

    ``amp``: an autocast type for the forward passes (training's validation uses its own,
    bfloat16 on a CPU that has it: 2.3x faster at 512 px). Without it, float16 autocast on
    CUDA and float32 on a CPU, as at inference: what is tested and reported.
    """
    network.eval()
    out: list[npt.NDArray[np.float32]] = []
    dtype = amp or _predict_dtype(device)
    step = scoring_batch(network, batch_size, *_size(images), device)
    with torch.inference_mode():
        for start in range(0, len(images), step):
            batch = _batch(images.images[start : start + step], device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = network(batch)
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float32))
    if not out:
        return np.zeros((0, 1), dtype=np.float32)
    return np.concatenate(out)


def scoring_seconds(
    config: FitConfig, images: ImageSet, device: torch.device, sample: int = 16
) -> float:
    """Seconds per image that :func:`predict` takes here for a network trained with ``config``.

    Timed on (up to) ``sample`` of ``images`` after two warm-up passes, with an untrained
    network of the same architecture, layout, mirror, rotated views and tiled scoring (the
    weights do not change the cost; real images do: an all-zero batch runs 2-3x slower on
    some CPUs).
    """
    network = build_network(config.architecture, config.num_classes).to(device)
    set_mirror(network, config.mirror)
    set_tiles(network, config.tile, config.tile_margin)
    set_rotation(network, config.rotation)
    if channels_last(device, mixed_precision_dtype(device, config.mixed_precision)):
        network = network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    count = max(1, min(sample, len(images)))
    step = scoring_batch(network, config.batch_size, *_size(images), device)
    first = _head(images, min(2 * step, count))  # warm-up: two passes of the timed size
    predict(network, first, device, config.batch_size)  # (the first in a process is slow)
    timed = _head(images, count)
    started = time.perf_counter()
    predict(network, timed, device, config.batch_size)
    return (time.perf_counter() - started) / count


def _size(images: ImageSet) -> tuple[int, int]:
    return int(images.images.shape[1]), int(images.images.shape[2])


def _head(images: ImageSet, count: int) -> ImageSet:
    return ImageSet(
        images.images[:count],
        images.labels[:count],
        images.body_parts[:count],
        images.difficulties[:count],
    )


def _predict_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast type of :func:`predict` without ``amp``: float16 on CUDA, else none."""
    return torch.float16 if device.type == "cuda" else None


def recalibrate_batchnorm(
    network: nn.Module, data: ImageSet, device: torch.device, batch_size: int, limit: int = 2048
) -> None:
    """Re-estimate batch-norm statistics on (up to ``limit``) unaugmented training images.

    The running averages lag far behind the weights in short runs, and an evaluation with
    them can fall to chance even when training went well; an exact average over the
    training images fixes that and costs one forward pass.
    """
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or len(data) < 2:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    network.train()
    with torch.no_grad():
        # spread over the whole set: a data set sorted by class must not skew the averages
        index = np.arange(len(data))[:: max(1, len(data) // limit)][:limit]
        for start in range(0, len(index), batch_size):
            chunk = index[start : start + batch_size]
            if len(chunk) >= 2:
                network(_batch(data.images[chunk], device))
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    network.eval()


def augment_batch(
    batch: torch.Tensor,
    generator: torch.Generator,
    mask: torch.Tensor | None = None,
    classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Random rotation (±10°), zoom (0.9-1.1), shift (±6 %), left-right flip, gamma, noise.

    A fracture ``mask`` and a class map ``classes`` (ids as floats; nearest neighbour), each
    shaped as the batch, get the same geometric transform.
    """
    n = batch.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-10.0, 10.0) * math.pi / 180.0
    scale = uniform(0.9, 1.1)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta[:, 0, 2], theta[:, 1, 2] = uniform(-0.12, 0.12), uniform(-0.12, 0.12)
    grid = F.affine_grid(theta.to(batch.device), list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if mask is not None:
        mask = F.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if classes is not None:
        classes = F.grid_sample(
            classes, grid, mode="nearest", padding_mode="zeros", align_corners=False
        )
    gamma = uniform(0.8, 1.25).to(batch.device).view(n, 1, 1, 1)
    out = out.clamp(0.0, 1.0).pow(gamma)
    noise = torch.randn(out.shape, generator=generator).to(batch.device)
    noisy = torch.rand(n, generator=generator).to(batch.device).view(n, 1, 1, 1) < 0.2
    return torch.where(noisy, (out + 0.02 * noise).clamp(0.0, 1.0), out), mask, classes


def class_weights(labels: npt.NDArray[np.int64], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights (mean 1); absent classes get weight 1."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 1.0)
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, gamma: float = 2.0
) -> torch.Tensor:
    """Class-weighted focal loss (Lin et al. 2017) on softmax logits."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    log_pt = log_probs.gather(1, target[:, None])[:, 0]
    focal = (1.0 - log_pt.exp()).pow(gamma)
    return (-weight[target] * focal * log_pt).sum() / weight[target].sum()


def seed_everything(seed: int) -> None:
    """Seed torch and numpy; deterministic cuDNN."""
    torch.manual_seed(seed)
    np.random.seed(seed)  # for libraries that use numpy's global generator
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def mixed_precision_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast type of training on ``device``, or None for plain float32.

    float16 on CUDA (with gradient scaling); bfloat16 on a CPU that has it natively, where
    it halves the time of a convolution step; None on other CPUs, where bfloat16 is
    emulated and slower than float32.
    """
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def channels_last(device: torch.device, amp: torch.dtype | None) -> bool:
    """Whether training keeps images and weights channels-last (NHWC).

    Always on a CPU: oneDNN's convolutions are faster in that layout in float32 as well
    as in bfloat16 (a FractureNet crop step 1.4x, a whole-image pass 1.5x on an AVX2
    CPU); on CUDA with mixed precision, where tensor cores want it.
    """
    return device.type == "cpu" or amp is not None


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---- helpers ----------------------------------------------------------------------------


def _train_epoch(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: _Scheduler,
    scaler: torch.amp.GradScaler,
    data: ImageSet,
    config: FitConfig,
    weights: torch.Tensor,
    generator: torch.Generator,
    device: torch.device,
    on_batch: Callable[[], None] | None,
    localiser: _Localiser,
    cropper: _Cropper | None = None,
    amp: torch.dtype | None = None,
    anatomist: _Anatomist | None = None,
    balance: _PartBalance | None = None,
) -> float:
    network.train()
    last = channels_last(device, amp)
    if balance is not None and balance.active:
        order = balance.draw(generator)
    else:
        order = torch.randperm(len(data), generator=generator).numpy()
    total, seen = 0.0, 0
    for start in range(0, len(order), config.batch_size):
        index = np.sort(order[start : start + config.batch_size])
        if len(index) < 2:  # batch norm needs two samples
            continue
        chunk = data if cropper is None else cropper.crops(index)
        rows = index if cropper is None else np.arange(len(index))
        batch = _batch(chunk.images[rows], device, last)
        mask = None
        if localiser.active and chunk.masks is not None:
            mask = _batch(chunk.masks[rows], device, last)
        classes = None
        if anatomist is not None and anatomist.active and chunk.anatomy is not None:
            classes = torch.from_numpy(chunk.anatomy[rows]).to(device).float().unsqueeze(1)
        if config.augment:
            batch, mask, classes = augment_batch(batch, generator, mask, classes)
        target = torch.from_numpy(chunk.labels[rows]).to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = network(batch).float()
        if balance is not None and balance.active:
            parts = [chunk.body_parts[int(r)] for r in rows]
            balance.record(parts, F.cross_entropy(logits.detach(), target, reduction="none"))
        if config.loss == "focal":
            loss = focal_loss(logits, target, weights)
        else:
            loss = F.cross_entropy(logits.float(), target, weight=weights)
        if mask is not None:
            loss = loss + config.localisation_weight * localiser.loss(mask)
        if classes is not None and anatomist is not None:
            loss = loss + config.anatomy_weight * anatomist.loss(classes)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        scaler.step(optimizer)
        scaler.update()
        if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step()  # cosine, timed: per batch
        total += float(loss.detach()) * len(index)
        seen += len(index)
        if on_batch is not None:
            on_batch()
        if isinstance(scheduler, _TimedOneCycle) and scheduler.done:
            break  # the time budget is spent: end annealed, mid-epoch if need be
    return total / max(seen, 1)


def _batch(images: npt.NDArray[np.uint8], device: torch.device, nhwc: bool = True) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    batch = tensor.float().div_(255.0).unsqueeze(1)
    if nhwc:  # channels-last: see channels_last()
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def _score(monitor: str, labels: npt.NDArray[np.int64], probs: npt.NDArray[np.float32]) -> float:
    if monitor == "auc" and probs.shape[1] == 2 and len(np.unique(labels)) == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float((probs.argmax(1) == labels).mean())


def one_cycle_rate(progress: float, max_lr: float, warmup: float = 0.15) -> float:
    """The one-cycle cosine learning rate at ``progress`` (0..1) of a run.

    Warms up from ``max_lr / 25`` to ``max_lr`` over the first ``warmup`` share, then anneals
    to ``max_lr / 25e4`` (the shape and end points of :class:`torch.optim.lr_scheduler.OneCycleLR`).
    """
    start, end = max_lr / 25.0, max_lr / 25e4
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return max_lr + (start - max_lr) * (1.0 + math.cos(math.pi * progress / warmup)) / 2.0
    rest = (progress - warmup) / (1.0 - warmup)
    return end + (max_lr - end) * (1.0 + math.cos(math.pi * rest)) / 2.0


class _TimedOneCycle:
    """One-cycle cosine over a time budget or a number of steps, whichever runs out first.

    An epoch-based schedule that the clock stops is cut off at a high rate; this one is at
    its low-rate end when the time is up, however fast the machine. Resumable: the state
    holds the steps taken and the seconds spent.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_lr: float,
        total_steps: int,
        seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.optimizer, self.max_lr = optimizer, max_lr
        self.total_steps, self.seconds, self.clock = max(1, total_steps), seconds, clock
        self.steps, self.spent, self.started = 0, 0.0, clock()
        self._apply()

    @property
    def progress(self) -> float:
        """Share of the run done (0..1): the larger of the step and time shares."""
        elapsed = self.spent + self.clock() - self.started
        return min(1.0, max(self.steps / self.total_steps, elapsed / self.seconds))

    @property
    def done(self) -> bool:
        """The run's budget (steps or time) is spent."""
        return self.progress >= 1.0

    def ends_before(self, epoch_seconds: float) -> bool:
        """Whether the run should stop after an epoch that took ``epoch_seconds``.

        When the time is spent, or what is left of it would hold less than half another
        epoch: that stub would train at the schedule's near-zero end rate (at most ~0.2 % of
        the peak on a run of 20 or more epochs) and still pay for a whole mining scan and
        validation after it (~40 s on a slow CPU).
        """
        left = self.seconds - (self.spent + self.clock() - self.started)
        return left <= 0.5 * epoch_seconds

    def step(self) -> None:
        """After each optimiser step."""
        self.steps += 1
        self._apply()

    def state_dict(self) -> dict[str, float]:
        """Steps taken and seconds spent so far."""
        return {"steps": self.steps, "spent": self.spent + self.clock() - self.started}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue a run from :meth:`state_dict`."""
        self.steps, self.spent = int(state["steps"]), float(state["spent"])
        self.started = self.clock()
        self._apply()

    def _apply(self) -> None:
        rate = one_cycle_rate(self.progress, self.max_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = rate


_Scheduler = (
    torch.optim.lr_scheduler.ReduceLROnPlateau
    | torch.optim.lr_scheduler.LRScheduler
    | _TimedOneCycle
)


def _progress(scheduler: _Scheduler, epoch: int, config: FitConfig) -> float:
    """Share of the run done after ``epoch`` (0-based): by time for the timed schedule."""
    if isinstance(scheduler, _TimedOneCycle):
        return scheduler.progress
    return (epoch + 1) / max(1, config.epochs)


def _scheduler(config: FitConfig, optimizer: torch.optim.Optimizer, images: int) -> _Scheduler:
    """ReduceLROnPlateau (factor 0.1, patience 5) by default; one-cycle cosine for short runs."""
    steps = max(1, sum(1 for s in range(0, images, config.batch_size) if images - s >= 2))
    if config.schedule == "timed":
        if config.max_minutes is None:
            raise ValueError("the timed schedule needs max_minutes")
        return _TimedOneCycle(
            optimizer, config.learning_rate, steps * config.epochs, config.max_minutes * 60.0
        )
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=config.learning_rate,
            total_steps=steps * config.epochs,
            pct_start=0.15,
        )
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=config.plateau_patience
    )


def _optimizer(
    config: FitConfig, network: nn.Module, *extra: nn.Module | None
) -> torch.optim.Optimizer:
    parameters = list(network.parameters())
    for head in extra:
        parameters += list(head.parameters()) if head is not None else []
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=1e-4)
    return torch.optim.SGD(parameters, lr=config.learning_rate, momentum=0.9, weight_decay=1e-4)


class _LayerWatch:
    """Keeps the output of one layer of the network (a forward hook) for a training-only loss."""

    active = False
    features: torch.Tensor | None = None

    def _watch(self, network: nn.Module, name: str, data: ImageSet, device: torch.device) -> int:
        """Hook ``name`` and run one blank image through: the layer's channel count."""
        self._hook = dict(network.named_modules())[name].register_forward_hook(self._keep)
        with torch.no_grad():
            network.eval()
            network(torch.zeros(1, 1, data.images.shape[1], data.images.shape[2], device=device))
        if self.features is None:
            raise RuntimeError(f"layer {name} produced no output")
        return int(self.features.shape[1])

    def close(self) -> None:
        """Remove the hook from the network (the registered model carries no trace of it)."""
        if self.active:
            self._hook.remove()

    def _keep(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        self.features = output


class _Localiser(_LayerWatch):
    """An auxiliary 1x1 convolution on the Grad-CAM layer that learns where the fracture is.

    Training only: it gives the network a dense signal (the drawn fracture line) on top of
    the image label, so that a few epochs suffice to find thin cracks; it is not part of
    the registered model. The Grad-CAM layer is named in :mod:`boneflow.models.networks`.
    """

    def __init__(
        self, network: nn.Module, config: FitConfig, data: ImageSet, device: torch.device
    ) -> None:
        self.active = config.localisation_weight > 0 and data.masks is not None
        self.features: torch.Tensor | None = None
        self.head: nn.Module | None = None
        if not self.active:
            return
        # A network with its own evidence map is supervised on it directly (no extra head).
        own_map = evidence_layer(config.architecture)
        channels = self._watch(network, own_map or gradcam_layer(config.architecture), data, device)
        if own_map is None:
            self.head = nn.Conv2d(channels, 1, kernel_size=1).to(device)

    def loss(self, mask: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the predicted fracture map against the (pooled) mask."""
        if self.features is None:
            raise RuntimeError("localiser used before a forward pass")
        features = self.features.float()
        predicted = self.head(features) if self.head is not None else features
        target = F.adaptive_max_pool2d(mask, predicted.shape[-2:]).clamp(0.0, 1.0)
        weight = 1.0 + 20.0 * target  # a crack covers few cells; do not let zeros win
        return F.binary_cross_entropy_with_logits(predicted, target, weight=weight)


class _Anatomist(_LayerWatch):
    """An auxiliary 1x1 convolution on the Grad-CAM layer that learns the anatomy per cell.

    Training only, like :class:`_Localiser`: per cell, no bone / one bone / overlapping
    bones / a growth plate or nutrient canal (``synth_raster.ANATOMY_CLASSES``, drawn by
    the generator). A false alarm of a fracture detector lies on exactly these structures
    (an overlap's edge, a physis); naming them gives the features a dense signal about
    what a crack is not. Not part of the registered model.
    """

    # the rarer classes count more: overlaps and distractor lines are few cells
    CLASS_WEIGHTS = (1.0, 1.0, 2.0, 4.0)

    def __init__(
        self, network: nn.Module, config: FitConfig, data: ImageSet, device: torch.device
    ) -> None:
        self.active = config.anatomy_weight > 0 and data.anatomy is not None
        self.features: torch.Tensor | None = None
        self.head: nn.Module | None = None
        self.weights = torch.tensor(self.CLASS_WEIGHTS, device=device)
        if not self.active:
            return
        channels = self._watch(network, gradcam_layer(config.architecture), data, device)
        self.head = nn.Conv2d(channels, len(self.CLASS_WEIGHTS), kernel_size=1).to(device)

    def loss(self, classes: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the predicted cell classes; a cell takes its highest class id."""
        if self.features is None or self.head is None:
            raise RuntimeError("anatomist used before a forward pass")
        predicted = self.head(self.features.float())
        target = F.adaptive_max_pool2d(classes, predicted.shape[-2:])[:, 0].round().long()
        return F.cross_entropy(predicted, target, weight=self.weights)


class _PartBalance:
    """Draws each epoch's training images by body part: more of the parts found hard.

    With ``share`` 0 (or one part) it is off and every epoch is a permutation of the
    training images. Otherwise an epoch draws as many images, with replacement: a part's
    chance is its number of images times its weight, and the weight is
    ``1 - share + share * (the part's mean loss / the mean loss)`` over the epoch before
    (1 for every part in the first epoch). A network that has learned the long bones and
    not yet the hand then gives the hand more of its steps; ``1 - share`` keeps every part
    in every epoch.
    """

    def __init__(self, parts: Sequence[str], share: float) -> None:
        self.share = share
        self.names = sorted(set(parts))
        self._code = {name: k for k, name in enumerate(self.names)}
        self.codes = np.array([self._code[p] for p in parts], dtype=np.int64)
        self.weights = np.ones(len(self.names))
        self._sums = np.zeros(len(self.names))
        self._counts = np.zeros(len(self.names))

    @property
    def active(self) -> bool:
        """Whether epochs are drawn by part."""
        return self.share > 0 and len(self.names) > 1

    def probabilities(self) -> npt.NDArray[np.float64] | None:
        """Each training image's chance to be drawn (None when off: uniform)."""
        if not self.active:
            return None
        chance = self.weights[self.codes]
        out: npt.NDArray[np.float64] = chance / chance.sum()
        return out

    def draw(self, generator: torch.Generator) -> npt.NDArray[np.int64]:
        """One epoch's image indices (as many as there are training images)."""
        chance = torch.from_numpy(self.weights[self.codes])
        drawn = torch.multinomial(chance, len(self.codes), replacement=True, generator=generator)
        out: npt.NDArray[np.int64] = drawn.numpy()
        return out

    def record(self, parts: Sequence[str], losses: torch.Tensor) -> None:
        """The training losses of one batch, by the body part of each sample."""
        codes = [self._code.get(p, -1) for p in parts]
        for code, loss in zip(codes, losses.float().tolist(), strict=True):
            if code >= 0:
                self._sums[code] += loss
                self._counts[code] += 1

    def update(self) -> None:
        """After an epoch: the next epoch's weights from this one's losses."""
        if not self.active or not self._counts.sum():
            return
        seen = self._counts > 0
        mean = self._sums.sum() / self._counts.sum()
        relative = np.ones(len(self.names))
        relative[seen] = self._sums[seen] / self._counts[seen] / max(mean, 1e-12)
        self.weights = 1.0 - self.share + self.share * relative
        self._sums[:], self._counts[:] = 0.0, 0.0

    def state_dict(self) -> dict[str, float]:
        """The current weight of each part."""
        return dict(zip(self.names, self.weights.tolist(), strict=True))

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue with the weights of :meth:`state_dict`."""
        self.weights = np.array([float(state.get(name, 1.0)) for name in self.names])


class _Cropper:
    """Training on crops: fracture lines at full detail, a whole image at validation.

    A thin crack is a few pixels of a large image; trained on whole images a network
    memorises the training set before it finds them. With ``crop_size`` set, every training
    image gives one crop per epoch instead: for a fractured image, most of the time one
    around its fracture line (label 1 when the crop holds enough of the line); otherwise a
    crop anywhere (label 0 unless it happens to hold the line) -- on bone most of the time,
    on the worst false alarms of the previous epoch some of the time (hard negatives, mined
    on whole training images from the network's own evidence map), and uniformly at random
    the rest, so that markers, edges and soft tissue are seen as well. A fully-convolutional
    network with a pooled evidence map (FractureNet) then scores whole images unchanged.
    Needs the fracture masks the synthetic data carry; without masks training uses whole
    images.
    """

    ON_LINE = 0.6  # share of a fractured image's crops placed on its line
    UNIFORM = 0.35  # of the rest: share placed uniformly (the others on bone)
    MIN_LINE_PIXELS = 8  # a crop is positive when it holds this much of the drawn line
    MINE_IMAGES = 64  # whole training images scanned for false alarms per epoch (128 until 7 Dec)
    PEAKS = 3  # evidence peaks looked at per scanned image, a quarter crop apart (1 before 6 Dec)
    POOL = 2000  # hard negatives kept (the newest)

    def __init__(
        self,
        data: ImageSet,
        masks: npt.NDArray[np.uint8],
        size: int,
        seed: int,
        hard_share: float = 0.3,
    ):
        self.data, self.masks, self.size = data, masks, size
        self.hard_share = hard_share  # of the other crops: share taken from mined false alarms
        self.rng = np.random.default_rng(seed)
        self.hard: list[tuple[int, int, int]] = []
        # per image, found once: the line's pixels and the bright (bony) points of a 1/4 grid
        self._line: dict[int, npt.NDArray[np.int16]] = {}
        self._bone: dict[int, npt.NDArray[np.int16]] = {}

    @classmethod
    def create(cls, data: ImageSet, config: FitConfig) -> _Cropper | None:
        """A cropper when the configuration asks for one and the data allow it."""
        if config.crop_size <= 0:
            return None
        if data.masks is None:
            log.warning("crop_size %d ignored: the data carry no fracture masks", config.crop_size)
            return None
        if config.crop_size >= min(data.images.shape[1:]):
            return None
        return cls(data, data.masks, config.crop_size, config.seed, config.hard_negatives)

    def crops(self, index: npt.NDArray[np.int64]) -> ImageSet:
        """One crop of each indexed image, with its mask and label."""
        size = self.size
        images = np.empty((len(index), size, size), dtype=np.uint8)
        masks = np.empty((len(index), size, size), dtype=np.uint8)
        labels = np.empty(len(index), dtype=np.int64)
        anatomy = self.data.anatomy
        classes = np.empty_like(masks) if anatomy is not None else None
        parts: list[str] = []
        for row, i in enumerate(index):
            i, y, x = self._centre(int(i))
            parts.append(self.data.body_parts[i])
            y0, x0 = self._corner(y, x)
            images[row] = self.data.images[i, y0 : y0 + size, x0 : x0 + size]
            masks[row] = self.masks[i, y0 : y0 + size, x0 : x0 + size]
            labels[row] = int(np.count_nonzero(masks[row]) >= self.MIN_LINE_PIXELS)
            if classes is not None and anatomy is not None:
                classes[row] = anatomy[i, y0 : y0 + size, x0 : x0 + size]
        # each crop keeps the body part of the image it was cut from (hard negatives too)
        return ImageSet(
            images, labels, tuple(parts), ("none",) * len(index), masks, anatomy=classes
        )

    def sample(self, count: int = 512) -> ImageSet:
        """Crops of random training images (batch-norm statistics at the training scale)."""
        return self.crops(self.rng.choice(len(self.data), min(count, len(self.data))))

    def mine(
        self,
        network: nn.Module,
        localiser: _Localiser,
        device: torch.device,
        amp: torch.dtype | None = None,
        weights: npt.NDArray[np.float64] | None = None,
    ) -> None:
        """Remember where the network's evidence peaks away from any fracture line.

        ``amp``: training's autocast type (bfloat16 halves the scan on a CPU that has it).
        ``weights``: each training image's chance to be scanned (uniform without).
        """
        if localiser.head is not None or not localiser.active:
            return  # only a network with its own evidence map says where it looks
        network.eval()
        count = min(
            self.MINE_IMAGES,
            len(self.data),
            int(np.count_nonzero(weights)) if weights is not None else len(self.data),
        )
        index = self.rng.choice(len(self.data), count, False, p=weights)
        guard = self.size // 4
        with torch.inference_mode(), single_pass(network):
            step = scoring_batch(network, 16, *_size(self.data), device)
            for start in range(0, len(index), step):
                chunk = np.sort(index[start : start + step])
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    network(_batch(self.data.images[chunk], device))
                if localiser.features is None:
                    return
                evidence = localiser.features.float()[:, 0]
                rows, cols = evidence.shape[-2:]
                cell_y = self.data.images.shape[1] / rows
                cell_x = self.data.images.shape[2] / cols
                reach = max(int(guard / cell_y), 1)  # peaks at least a quarter crop apart
                for k, i in enumerate(chunk):
                    cells = evidence[k].clone()
                    for _ in range(self.PEAKS):
                        cy, cx = divmod(int(cells.argmax()), cols)
                        cells[
                            max(0, cy - reach) : cy + reach + 1, max(0, cx - reach) : cx + reach + 1
                        ] = -math.inf
                        y, x = int((cy + 0.5) * cell_y), int((cx + 0.5) * cell_x)
                        near = self.masks[
                            i, max(0, y - guard) : y + guard, max(0, x - guard) : x + guard
                        ]
                        if not near.any():
                            self.hard.append((int(i), y, x))
        del self.hard[: -self.POOL]
        network.train()

    def _centre(self, i: int) -> tuple[int, int, int]:
        rng, height, width = self.rng, self.data.images.shape[1], self.data.images.shape[2]
        if self.data.labels[i] == 1 and rng.random() < self.ON_LINE:
            if i not in self._line:
                self._line[i] = np.argwhere(self.masks[i]).astype(np.int16)
            line = self._line[i]
            if len(line):
                y, x = line[int(rng.integers(len(line)))]
                jitter = self.size // 3
                dy, dx = rng.integers(-jitter, jitter + 1, size=2)
                return i, int(y + dy), int(x + dx)
        if self.hard and rng.random() < self.hard_share:
            j, y, x = self.hard[int(rng.integers(len(self.hard)))]
            dy, dx = rng.integers(-self.size // 8, self.size // 8 + 1, size=2)
            return j, int(y + dy), int(x + dx)
        if rng.random() < self.UNIFORM:
            return i, int(rng.integers(height)), int(rng.integers(width))
        if i not in self._bone:
            coarse = self.data.images[i, ::4, ::4]
            self._bone[i] = np.argwhere(coarse >= np.percentile(coarse, 85)).astype(np.int16)
        y, x = self._bone[i][int(rng.integers(len(self._bone[i])))]
        return i, int(y) * 4, int(x) * 4

    def _corner(self, y: int, x: int) -> tuple[int, int]:
        height, width = self.data.images.shape[1:]
        half = self.size // 2
        return (
            int(np.clip(y - half, 0, height - self.size)),
            int(np.clip(x - half, 0, width - self.size)),
        )


def _place_classes(
    out: npt.NDArray[np.uint8], source: npt.NDArray[np.uint8], geometry: Geometry
) -> None:
    """A class map on the source grid onto the input grid, as preprocessing places pixels."""
    rows, cols = geometry.resized_shape
    resized = cv2.resize(source, (cols, rows), interpolation=cv2.INTER_NEAREST)
    top, left = geometry.pad_top, geometry.pad_left
    out[top : top + rows, left : left + cols] = resized


def _draw_segment(
    mask: npt.NDArray[np.uint8], segment: tuple[float, float, float, float], geometry: Geometry
) -> None:
    scale = geometry.scale
    x0, y0, x1, y1 = segment
    start = (round(x0 * scale + geometry.pad_left), round(y0 * scale + geometry.pad_top))
    end = (round(x1 * scale + geometry.pad_left), round(y1 * scale + geometry.pad_top))
    thickness = max(2, geometry.input_size // 48)
    cv2.line(mask, start, end, color=255, thickness=thickness)


def _state_copy(network: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in network.state_dict().items()}
