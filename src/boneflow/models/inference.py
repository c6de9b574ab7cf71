"""The analysis of radiographs: body-part router, then that part's fracture model with Grad-CAM.

:class:`Analyzer` is created once per worker process and reused: models are loaded on first
use and kept. ``analyse(images)`` batches across images (a study), runs the router in
inference mode, then, per fracture model, one Grad-CAM pass that yields both P(fracture)
and the heat map. Every image gets a :class:`~boneflow.findings.Finding`; an image the
router cannot place with confidence, or whose part no fracture model covers, is
``NOT_ANALYSED`` with the reason - never a guess.

The DICOM header as a prior: ``ImageInput.body_part_hint`` is Body Part Examined. When it
names one of the router's parts unambiguously (``HAND``, ``FINGER`` → hand, ``LEG`` →
lower_leg, ``CHEST`` or ``KNEE`` → other, ... see :data:`HEADER_PARTS`) the router's
probability of that part is multiplied by :data:`HINT_ODDS` (4) and the probabilities are
renormalised: it settles a close call but cannot overrule a confident router, because
headers are often set from the protocol rather than the image. Vague values
(``EXTREMITY``, ``ARM``, empty) are ignored. View Position (AP, PA, LAT ...) names the
projection, not the part, so it is not used.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
import torch

from boneflow.errors import ConfigError
from boneflow.findings import Finding, FindingStatus, ModelId
from boneflow.models.gradcam import FractureGradCAM, hotspot
from boneflow.models.networks import gradcam_layer, scoring_batch
from boneflow.models.registry import LoadedModel, ModelManifest, Registry
from boneflow.models.transforms import Geometry, PreprocessParams, preprocess, unmap_heatmap

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

HINT_ODDS = 4.0
HEADER_PARTS: dict[str, str] = {
    "HAND": "hand",
    "FINGER": "hand",
    "THUMB": "hand",
    "WRIST": "wrist",
    "FOREARM": "forearm",
    "ELBOW": "elbow",
    "HUMERUS": "humerus",
    "UPPER ARM": "humerus",
    "SHOULDER": "shoulder",
    "LEG": "lower_leg",  # DICOM's LEG is the lower leg
    "LOWER LEG": "lower_leg",
    "LOWERLEG": "lower_leg",
    "TIBIA": "lower_leg",
    "FIBULA": "lower_leg",
    # Parts no fracture model covers.
    "CHEST": "other",
    "THORAX": "other",
    "SKULL": "other",
    "HEAD": "other",
    "NECK": "other",
    "CSPINE": "other",
    "TSPINE": "other",
    "LSPINE": "other",
    "SSPINE": "other",
    "SPINE": "other",
    "ABDOMEN": "other",
    "PELVIS": "other",
    "HIP": "other",
    "FEMUR": "other",
    "THIGH": "other",
    "KNEE": "other",
    "ANKLE": "other",
    "FOOT": "other",
    "BREAST": "other",
}


@dataclass(frozen=True)
class ImageInput:
    """One image to analyse.

    ``pixels`` are display-ready (``dicom.pixels.read_pixels``: float32, bone bright);
    ``body_part_hint`` is the raw Body Part Examined (or None); ``laterality`` "L"/"R"/None.
    """

    sop_instance_uid: str
    pixels: FloatArray = field(repr=False)
    body_part_hint: str | None = None
    laterality: str | None = None


def part_from_header(body_part_examined: str | None) -> str | None:
    """The router part that a Body Part Examined value names unambiguously, else None."""
    if not body_part_examined:
        return None
    key = " ".join(body_part_examined.replace("_", " ").replace("-", " ").upper().split())
    return HEADER_PARTS.get(key)


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ConfigError: naming DEVICE, when CUDA is asked for but not usable.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("DEVICE", f"{device!r} asked for, but no CUDA device is available")
        resolved = torch.device(device)
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError("DEVICE", f"{device!r}: only {torch.cuda.device_count()} GPU(s)")
        return resolved
    raise ConfigError("DEVICE", f"{device!r} is not auto, cpu, cuda or cuda:N")


class Analyzer:
    """Router → fracture model → Grad-CAM for batches of images; create once per process.

    Args:
        registry: where the models are.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: images per forward pass (on a CPU at most what
            :func:`~boneflow.models.networks.scoring_batch` allows for the input size).
        threads: torch CPU threads; None = the CPUs this process may use (or
            ``OMP_NUM_THREADS`` when set).

    Raises:
        ModelNotFound: no router is registered.
        ConfigError: the device is not usable.
    """

    def __init__(
        self,
        registry: Registry,
        device: str = "auto",
        batch_size: int = 16,
        threads: int | None = None,
    ) -> None:
        self.registry = registry
        self.device = resolve_device(device)
        self.batch_size = max(1, batch_size)
        if self.device.type == "cpu":
            _set_cpu_threads(threads)
        self._models: dict[str, LoadedModel] = {}
        self._cams: dict[str, FractureGradCAM] = {}
        self.router_manifest = registry.router()
        self._model(self.router_manifest)  # load now: fail at start, not on the first study

    def analyse(self, images: Sequence[ImageInput]) -> list[Finding]:
        """One :class:`Finding` per image, in order."""
        if not images:
            return []
        started = time.perf_counter()
        router = self.router_manifest
        router_id = ModelId(router.name, router.version)
        timings: list[dict[str, float]] = [{} for _ in images]
        prepared = [self._prepare(image, router, timings[i]) for i, image in enumerate(images)]
        ready = [i for i, p in enumerate(prepared) if not isinstance(p, str)]
        probs = self._route([prepared[i] for i in ready], router, [timings[i] for i in ready])

        findings: dict[int, Finding] = {}
        analyse_with: dict[str, list[tuple[int, str, float]]] = {}
        manifests: dict[str, ModelManifest] = {}
        for i, p in enumerate(prepared):
            if isinstance(p, str):
                findings[i] = _not_analysed(images[i], router_id, None, 0.0, p, timings[i])
        for row, i in enumerate(ready):
            part, confidence, reason = self._decide(probs[row], images[i].body_part_hint, router)
            if reason is None:
                assert part is not None
                manifest = self.registry.fracture_model_for(part)
                if manifest is None:
                    reason = f"no fracture model covers body part {part!r}"
                else:
                    manifests[manifest.model_id] = manifest
                    analyse_with.setdefault(manifest.model_id, []).append((i, part, confidence))
                    continue
            findings[i] = _not_analysed(images[i], router_id, part, confidence, reason, timings[i])

        for model_id, members in analyse_with.items():
            step = self._batch_size(manifests[model_id])
            for start in range(0, len(members), step):
                chunk = members[start : start + step]
                found = self._fracture(
                    images, chunk, manifests[model_id], router_id, timings, prepared
                )
                findings.update(found)

        total_ms = (time.perf_counter() - started) * 1000 / len(images)
        out = []
        for i in range(len(images)):
            finding = findings[i]
            stages = dict(finding.timings_ms)
            stages["total"] = round(total_ms, 2)
            out.append(_with_timings(finding, stages))
        return out

    # --- stages ---------------------------------------------------------------------------------

    def _prepare(
        self, image: ImageInput, router: ModelManifest, timing: dict[str, float]
    ) -> tuple[FloatArray, Geometry] | str:
        """Router input for one image, or the reason it cannot be made."""
        t0 = time.perf_counter()
        try:
            prepared = preprocess(image.pixels, _params(router))
        except ValueError as exc:
            log.warning("%s: cannot preprocess: %s", image.sop_instance_uid, exc)
            return f"image could not be preprocessed: {exc}"
        timing["preprocess"] = _ms_since(t0)
        return prepared

    def _route(
        self,
        prepared: Sequence[tuple[FloatArray, Geometry] | str],
        router: ModelManifest,
        timings: Sequence[dict[str, float]],
    ) -> npt.NDArray[np.float64]:
        """Router probabilities (N, parts), batched, in inference mode."""
        network = self._model(router).network
        step = self._batch_size(router)
        rows: list[npt.NDArray[np.float64]] = []
        for start in range(0, len(prepared), step):
            chunk = prepared[start : start + step]
            t0 = time.perf_counter()
            batch = self._batch([p[0] for p in chunk if not isinstance(p, str)])
            with torch.inference_mode(), self._autocast():
                logits = network(batch)
            rows.append(torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float64))
            per_image = _ms_since(t0) / len(chunk)
            for timing in timings[start : start + step]:
                timing["router"] = round(per_image, 2)
        if not rows:
            return np.zeros((0, len(router.labels)))
        return np.concatenate(rows)

    def _decide(
        self, probs: npt.NDArray[np.float64], hint: str | None, router: ModelManifest
    ) -> tuple[str | None, float, str | None]:
        """(body part, confidence, reason not analysed) from router output and header prior."""
        labels = list(router.labels)
        posterior = probs.copy()
        hinted = part_from_header(hint)
        if hinted in labels:
            posterior[labels.index(hinted)] *= HINT_ODDS
            posterior /= posterior.sum()
        best = int(np.argmax(posterior))
        confidence = float(posterior[best])
        if confidence < router.threshold:
            return (
                None,
                confidence,
                f"router not confident: best {labels[best]!r} at {confidence:.2f}, "
                f"below its threshold {router.threshold:.2f}",
            )
        return labels[best], confidence, None

    def _fracture(
        self,
        images: Sequence[ImageInput],
        chunk: Sequence[tuple[int, str, float]],
        manifest: ModelManifest,
        router_id: ModelId,
        timings: Sequence[dict[str, float]],
        routed: Sequence[tuple[FloatArray, Geometry] | str],
    ) -> dict[int, Finding]:
        """One Grad-CAM pass (probability + map) for a batch that shares a fracture model.

        When the fracture model preprocesses exactly as the router does, the router's
        inputs (``routed``) are used again instead of being made twice.
        """
        params = _params(manifest)
        t0 = time.perf_counter()
        same = params == _params(self.router_manifest)
        inputs = [
            routed_input
            if same and not isinstance(routed_input := routed[i], str)
            else preprocess(images[i].pixels, params)
            for i, _, _ in chunk
        ]
        prep_ms = _ms_since(t0) / len(chunk)
        self._model(manifest)
        cam = self._cams[manifest.model_id]
        t0 = time.perf_counter()
        with self._autocast():
            logits, maps = cam(self._batch([x for x, _ in inputs]))
        probabilities = manifest.fracture_probability(  # on the routed part's own scale
            torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy(),
            [part for _, part, _ in chunk],
        )
        maps_np = maps.float().cpu().numpy()
        model_ms = _ms_since(t0) / len(chunk)
        fracture_id = ModelId(manifest.name, manifest.version)
        found: dict[int, Finding] = {}
        for row, (i, part, confidence) in enumerate(chunk):
            t1 = time.perf_counter()
            geometry = inputs[row][1]
            heatmap = unmap_heatmap(maps_np[row], geometry)
            # the hotspot is found on the small map (cheap) and scaled to the source grid
            box = hotspot(geometry.content(maps_np[row]))
            box = None if box is None else geometry.box_to_source(box)
            timing = timings[i]
            timing["preprocess"] = round(timing.get("preprocess", 0.0) + prep_ms, 2)
            timing["fracture"] = round(model_ms, 2)
            timing["heatmap"] = _ms_since(t1)
            probability = float(probabilities[row])
            found[i] = Finding(
                sop_instance_uid=images[i].sop_instance_uid,
                status=FindingStatus.ANALYSED,
                body_part=part,
                body_part_confidence=confidence,
                router=router_id,
                fracture_probability=probability,
                fracture_present=probability >= manifest.threshold,
                threshold=manifest.threshold,
                fracture_model=fracture_id,
                laterality=images[i].laterality,
                heatmap=heatmap,
                hotspot=box,
                timings_ms=dict(timing),
            )
        return found

    # --- plumbing -------------------------------------------------------------------------------

    def _model(self, manifest: ModelManifest) -> LoadedModel:
        """Load (once) and cache a model on the device; fracture models get their Grad-CAM."""
        loaded = self._models.get(manifest.model_id)
        if loaded is None:
            t0 = time.perf_counter()
            loaded = self.registry.load(manifest.name, manifest.version)
            network = loaded.network.to(self.device)
            if self.device.type == "cpu":
                network = network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            network.requires_grad_(False)
            loaded = LoadedModel(network=network, manifest=loaded.manifest)
            self._models[manifest.model_id] = loaded
            if manifest.task == "fracture":
                layer = gradcam_layer(manifest.architecture)
                self._cams[manifest.model_id] = FractureGradCAM(network, layer)
            self._warm_up(manifest)
            log.info(
                "loaded model %s on %s in %.0f ms", manifest.model_id, self.device, _ms_since(t0)
            )
        return loaded

    def _batch_size(self, manifest: ModelManifest) -> int:
        """Images per pass of this model: ``batch_size``, fewer on a CPU for large inputs."""
        network = self._model(manifest).network
        size = manifest.input_size
        return scoring_batch(network, self.batch_size, size, size, self.device)

    def _warm_up(self, manifest: ModelManifest) -> None:
        """One pass on a blank input, so that the first study's timings are real ones."""
        blank = np.zeros((1, manifest.input_size, manifest.input_size), dtype=np.float32)
        batch = self._batch([blank])
        with self._autocast():
            if manifest.task == "fracture":
                self._cams[manifest.model_id](batch)
            else:
                with torch.inference_mode():
                    self._models[manifest.model_id].network(batch)

    def _batch(self, arrays: Sequence[FloatArray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(arrays)).to(self.device, non_blocking=True)
        if self.device.type == "cpu":
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _autocast(self) -> torch.autocast:
        # fp16 autocast on CUDA only: bf16 on CPU is faster here but changes the outputs.
        return torch.autocast(
            device_type=self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"
        )

    @property
    def loaded_models(self) -> list[str]:
        """``name@version`` of every model loaded so far."""
        return sorted(self._models)


# --- helpers -----------------------------------------------------------------------------------


_threads_set = False


def _set_cpu_threads(threads: int | None) -> None:
    """Use the CPUs this process may run on (once per process)."""
    global _threads_set
    if _threads_set:
        return
    if threads is None:
        from_env = os.environ.get("OMP_NUM_THREADS", "")
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        threads = int(from_env) if from_env.isdigit() else (available or os.cpu_count() or 1)
    torch.set_num_threads(max(1, threads))
    _threads_set = True


def _params(manifest: ModelManifest) -> PreprocessParams:
    values = dict(manifest.preprocessing)
    values["input_size"] = manifest.input_size
    return PreprocessParams.from_dict(values)


def _not_analysed(
    image: ImageInput,
    router: ModelId,
    part: str | None,
    confidence: float,
    reason: str,
    timing: dict[str, float],
) -> Finding:
    log.info("%s: not analysed: %s", image.sop_instance_uid, reason)
    return Finding(
        sop_instance_uid=image.sop_instance_uid,
        status=FindingStatus.NOT_ANALYSED,
        body_part=part,
        body_part_confidence=confidence,
        router=router,
        reason=reason,
        laterality=image.laterality,
        timings_ms=dict(timing),
    )


def _with_timings(finding: Finding, timings: dict[str, float]) -> Finding:
    return replace(finding, timings_ms=timings)


def _ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


__all__ = [
    "HEADER_PARTS",
    "HINT_ODDS",
    "Analyzer",
    "ImageInput",
    "part_from_header",
    "resolve_device",
]
