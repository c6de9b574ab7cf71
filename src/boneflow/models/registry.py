"""The model registry on disk: ``<MODEL_DIR>/<name>/<version>/{model.safetensors, manifest.json}``.

Weights are safetensors (no code runs when they load); the manifest names the network,
labels, preprocessing, operating threshold, probability calibration, metrics and the sha256
of the weights, which is checked on every load. A version folder is written under a
temporary name and renamed into place, so a reader never sees half a model; versions are
never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from boneflow.config import Settings
from boneflow.errors import ModelIntegrityError, ModelNotFound
from boneflow.fsio import fsync_path
from boneflow.models.networks import (
    build_network,
    check_rotation,
    check_tiles,
    set_mirror,
    set_rotation,
    set_tiles,
    supports_mirror,
    supports_rotation,
    supports_tiles,
)

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

Task = Literal["router", "fracture"]
FRACTURE_LABELS: tuple[str, str] = ("no_fracture", "fracture")


@dataclass(frozen=True)
class ModelManifest:
    """What a registered model is, how to feed it and how far to trust it.

    ``labels`` are the output classes in order (router: body parts; fracture:
    ``("no_fracture", "fracture")``). ``body_parts`` are the parts the model covers.
    ``threshold`` is, for a fracture model, the operating threshold on P(fracture); for a
    router, the minimum confidence to accept a part. ``preprocessing`` is
    :meth:`boneflow.models.transforms.PreprocessParams.to_dict`. ``calibration`` (fracture
    models, optional) is Platt scaling fitted on validation, ``{"scale": a, "offset": b}``:
    the reported P(fracture) is ``sigmoid(a * logit(p) + b)`` of the network's ``p``
    (:meth:`fracture_probability`), and ``threshold`` applies to that calibrated value.
    Empty (manifests written before 2026-12-07): the network's ``p`` unchanged.
    ``calibration_by_part`` (optional, since 2026-12-07) holds the same ``{"scale",
    "offset"}`` for body parts whose validation images were enough to fit their own: one
    model covering several parts does not score them on one scale (a shoulder's normal
    joint looks more like a fracture than a forearm's shaft), so each such part's P is
    calibrated on its own and the one ``threshold`` means the same for every part. A part
    without an entry uses ``calibration``.
    ``mirror`` (fracture models of an architecture that can, since 2026-12-07; default
    false): the network scores each image together with its left-right mirror image and
    averages the two evidence maps (``networks.FractureNet``); the calibration, threshold
    and metrics were all measured that way.
    ``tile`` and ``tile_margin`` (px; fracture models of an architecture that can, since
    2026-12-07; default 0, the whole image at once): the network scores each image in
    tiles of ``tile`` px, each evidence cell taken from a tile that extends about
    ``tile_margin`` px beyond it (``networks.FractureNet``); measured that way too.
    ``rotation`` (degrees; fracture models of an architecture that can, since 2026-12-08;
    default 0, off): the network also scores each image turned by +/- ``rotation`` degrees
    and averages the three log-odds (``networks.FractureNet``); measured that way too.
    """

    name: str
    version: str
    task: Task
    architecture: str
    labels: tuple[str, ...]
    body_parts: tuple[str, ...]
    input_size: int = 224
    preprocessing: Mapping[str, Any] = field(default_factory=dict)
    threshold: float = 0.5
    metrics: Mapping[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    created_at: str = ""
    training: Mapping[str, Any] = field(default_factory=dict)
    calibration: Mapping[str, float] = field(default_factory=dict)
    calibration_by_part: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    mirror: bool = False
    tile: int = 0
    tile_margin: int = 0
    rotation: float = 0.0
    weights_file: str = WEIGHTS_FILE
    weights_sha256: str = ""

    def __post_init__(self) -> None:
        for what, value in (("name", self.name), ("version", self.version)):
            if not _NAME_RE.match(value):
                raise ValueError(f"model {what} {value!r}: use letters, digits, '.', '_', '-'")
        if self.task not in ("router", "fracture"):
            raise ValueError(f"task must be 'router' or 'fracture', not {self.task!r}")
        if self.task == "fracture" and tuple(self.labels) != FRACTURE_LABELS:
            raise ValueError(f"a fracture model's labels must be {FRACTURE_LABELS}")
        if len(self.labels) < 2:
            raise ValueError("a model needs at least two labels")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within 0..1, not {self.threshold}")
        if (self.calibration or self.calibration_by_part) and self.task != "fracture":
            raise ValueError("only a fracture model has a probability calibration")
        if self.calibration:
            _check_scaling("calibration", self.calibration)
        if self.mirror and not (self.task == "fracture" and supports_mirror(self.architecture)):
            raise ValueError(f"{self.architecture} cannot score mirror images (mirror: true)")
        if self.tile and not (self.task == "fracture" and supports_tiles(self.architecture)):
            raise ValueError(f"{self.architecture} cannot score in tiles (tile: {self.tile})")
        check_tiles(self.tile, self.tile_margin)
        if self.rotation and not (self.task == "fracture" and supports_rotation(self.architecture)):
            raise ValueError(
                f"{self.architecture} cannot score rotated views (rotation: {self.rotation})"
            )
        check_rotation(self.rotation)
        for part, scaling in self.calibration_by_part.items():
            if part not in self.body_parts:
                raise ValueError(f"calibration_by_part: {part!r} is not one of body_parts")
            _check_scaling(f"calibration of {part}", scaling)

    def fracture_probability(
        self, raw: npt.ArrayLike, body_parts: str | Sequence[str] | None = None
    ) -> npt.NDArray[np.float64]:
        """The reported P(fracture) for the network's softmax ``raw`` (its calibration).

        ``body_parts``: the part of each value (or one part for all); a part with its own
        calibration (``calibration_by_part``) uses it, any other the model's calibration.
        """
        return calibrated(raw, body_parts, self.calibration, self.calibration_by_part)

    @property
    def model_id(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``manifest.json`` holds)."""
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["body_parts"] = list(self.body_parts)
        data["preprocessing"] = dict(self.preprocessing)
        data["metrics"] = dict(self.metrics)
        data["training"] = dict(self.training)
        data["calibration"] = dict(self.calibration)
        data["calibration_by_part"] = {k: dict(v) for k, v in self.calibration_by_part.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelManifest:
        """Read back :meth:`to_dict`; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["labels"] = tuple(values.get("labels", ()))
        values["body_parts"] = tuple(values.get("body_parts", ()))
        values["input_size"] = int(values.get("input_size", 224))
        values["threshold"] = float(values.get("threshold", 0.5))
        values["mirror"] = values.get("mirror", False) is True
        values["tile"] = int(values.get("tile", 0))
        values["tile_margin"] = int(values.get("tile_margin", 0))
        values["rotation"] = float(values.get("rotation", 0.0))
        scaling = dict(values.get("calibration") or {})
        values["calibration"] = {k: float(v) for k, v in scaling.items()}
        by_part = dict(values.get("calibration_by_part") or {})
        values["calibration_by_part"] = {
            str(part): {k: float(v) for k, v in dict(scaling).items()}
            for part, scaling in by_part.items()
        }
        return cls(**values)


def calibrated(
    raw: npt.ArrayLike,
    body_parts: str | Sequence[str] | None,
    calibration: Mapping[str, float],
    by_part: Mapping[str, Mapping[str, float]],
) -> npt.NDArray[np.float64]:
    """``raw`` under ``calibration``, or its part's entry of ``by_part`` where it has one."""
    p = np.asarray(raw, dtype=np.float64)
    parts = [body_parts] * p.size if isinstance(body_parts, str) else body_parts
    if parts is not None and len(parts) != p.size:
        raise ValueError(f"{len(parts)} body parts for {p.size} probabilities")
    out = _scaled(p, calibration)
    if parts is None:
        return out
    for part, scaling in by_part.items():
        chosen = np.array([x == part for x in parts], dtype=bool).reshape(p.shape)
        out[chosen] = _scaled(p[chosen], scaling)
    return out


def _check_scaling(what: str, scaling: Mapping[str, float]) -> None:
    scale, offset = scaling.get("scale"), scaling.get("offset")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"{what} scale must be a positive number, not {scale!r}")
    if not (isinstance(offset, (int, float)) and math.isfinite(offset)):
        raise ValueError(f"{what} offset must be a finite number, not {offset!r}")


def _scaled(p: npt.NDArray[np.float64], scaling: Mapping[str, float]) -> npt.NDArray[np.float64]:
    if not scaling:
        return p.copy()
    return platt(p, float(scaling["scale"]), float(scaling["offset"]))


def logit(probabilities: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``log(p / (1 - p))``, with p kept within 1e-7 of 0 and 1."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-7, 1.0 - 1e-7)
    return np.asarray(np.log(p) - np.log1p(-p), dtype=np.float64)


def platt(probabilities: npt.ArrayLike, scale: float, offset: float) -> npt.NDArray[np.float64]:
    """``sigmoid(scale * logit(p) + offset)``: Platt scaling of probabilities (monotone)."""
    z = scale * logit(probabilities) + offset
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -500.0, 500.0))), dtype=np.float64)


@dataclass(frozen=True)
class LoadedModel:
    """A network with verified weights, in eval mode, and its manifest."""

    network: nn.Module
    manifest: ModelManifest


class Registry:
    """Models under one directory; cheap to create, reads the disk on every call."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)

    def register(self, network: nn.Module, manifest: ModelManifest) -> ModelManifest:
        """Write the network's weights and the manifest as a new version.

        ``created_at`` is filled in when empty; ``weights_sha256`` is always computed here.

        Returns:
            The manifest as written.

        Raises:
            FileExistsError: that name and version are already registered.
        """
        final = self.model_dir / manifest.name / manifest.version
        if final.exists():
            raise FileExistsError(f"model {manifest.model_id} is already registered at {final}")
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{manifest.version}.", dir=final.parent))
        try:
            weights = staging / WEIGHTS_FILE
            state = {k: v.detach().to("cpu").contiguous().clone() for k, v in _state(network)}
            save_file(state, str(weights), metadata={"model": manifest.model_id})
            written = replace(
                manifest,
                weights_file=WEIGHTS_FILE,
                weights_sha256=_sha256(weights.read_bytes()),
                created_at=manifest.created_at or datetime.now(UTC).isoformat(timespec="seconds"),
            )
            manifest_path = staging / MANIFEST_FILE
            manifest_path.write_text(json.dumps(written.to_dict(), indent=2, sort_keys=True))
            for path in (weights, manifest_path):
                fsync_path(path)
            os.rename(staging, final)  # atomic: readers see all of it or nothing
            fsync_path(final.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("registered model %s at %s", written.model_id, final)
        return written

    def list(self) -> list[ModelManifest]:
        """Every registered model, sorted by name, then oldest to newest version.

        A folder whose manifest cannot be read is logged and left out.
        """
        found: list[ModelManifest] = []
        if not self.model_dir.is_dir():
            return found
        for manifest_path in sorted(self.model_dir.glob(f"*/*/{MANIFEST_FILE}")):
            if manifest_path.parent.name.startswith("."):
                continue  # a registration in progress (or one that died half-way)
            try:
                found.append(_read_manifest(manifest_path))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("ignoring unreadable model manifest %s: %s", manifest_path, exc)
        return sorted(found, key=lambda m: (m.name, _newness(m)))

    def manifest(self, name: str, version: str | None = None) -> ModelManifest:
        """The manifest of ``name`` at ``version`` (newest when None).

        Raises:
            ModelNotFound: no such model or version.
        """
        candidates = [m for m in self.list() if m.name == name]
        if version is not None:
            candidates = [m for m in candidates if m.version == version]
        if not candidates:
            wanted = name if version is None else f"{name}@{version}"
            raise ModelNotFound(f"no registered model {wanted} in {self.model_dir}")
        return candidates[-1]

    def load(self, name: str, version: str | None = None) -> LoadedModel:
        """Build the network, verify and load its weights, switch it to eval mode.

        Raises:
            ModelNotFound: no such model or version.
            ModelIntegrityError: the weights do not match the manifest's sha256 or shapes.
        """
        manifest = self.manifest(name, version)
        folder = self.model_dir / manifest.name / manifest.version
        weights_path = folder / manifest.weights_file
        try:
            data = weights_path.read_bytes()
        except OSError as exc:
            raise ModelIntegrityError(f"{manifest.model_id}: cannot read weights: {exc}") from exc
        digest = _sha256(data)
        if digest != manifest.weights_sha256:
            raise ModelIntegrityError(
                f"{manifest.model_id}: sha256 of {weights_path.name} is {digest}, "
                f"manifest says {manifest.weights_sha256}; refusing to load"
            )
        network = build_network(manifest.architecture, len(manifest.labels))
        try:
            state = load_safetensors(data)
            network.load_state_dict(state, strict=True)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelIntegrityError(f"{manifest.model_id}: weights do not fit: {exc}") from exc
        set_mirror(network, manifest.mirror)
        set_tiles(network, manifest.tile, manifest.tile_margin)
        set_rotation(network, manifest.rotation)
        network.eval()
        return LoadedModel(network=network, manifest=manifest)

    def router(self) -> ModelManifest:
        """The newest body-part router.

        Raises:
            ModelNotFound: no router is registered.
        """
        routers = [m for m in self.list() if m.task == "router"]
        if not routers:
            raise ModelNotFound(f"no body-part router registered in {self.model_dir}")
        return max(routers, key=_newness)

    def fracture_model_for(self, body_part: str) -> ModelManifest | None:
        """The newest fracture model covering ``body_part``, or None."""
        covering = [m for m in self.list() if m.task == "fracture" and body_part in m.body_parts]
        return max(covering, key=_newness) if covering else None

    def next_version(self, name: str) -> str:
        """One more than the highest integer version of ``name`` ("1" for a new name)."""
        numbers = [int(m.version) for m in self.list() if m.name == name and m.version.isdigit()]
        return str(max(numbers, default=0) + 1)


def models_command(settings: Settings, as_json: bool) -> int:
    """``boneflow models``: list the registered models, versions, metrics and thresholds."""
    registry = Registry(settings.resolved_model_dir)
    manifests = registry.list()
    if as_json:
        print(json.dumps([m.to_dict() for m in manifests], indent=2))
        return 0
    if not manifests:
        print(f"no models registered in {registry.model_dir} (try: boneflow train --demo)")
        return 0
    print(f"models in {registry.model_dir}")
    rows = [("model", "task", "network", "threshold", "test metrics", "body parts", "created")]
    for m in manifests:
        rows.append(
            (
                m.model_id,
                m.task,
                f"{m.architecture}@{m.input_size}px",
                f"{m.threshold:.3f}" + (" (calibrated P)" if m.calibration else ""),
                _short_metrics(m.metrics),
                ",".join(m.body_parts),
                m.created_at[:19],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


# --- helpers -----------------------------------------------------------------------------------


def _state(network: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(network.state_dict().items())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_manifest(path: Path) -> ModelManifest:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("manifest is not a JSON object")
    manifest = ModelManifest.from_dict(data)
    if (manifest.name, manifest.version) != (path.parent.parent.name, path.parent.name):
        raise ValueError(f"manifest says {manifest.model_id}, folder says otherwise")
    return manifest


def _newness(manifest: ModelManifest) -> tuple[str, tuple[tuple[int, str], ...]]:
    """Sort key: creation time, then the version compared naturally (2 < 10)."""
    parts = re.findall(r"\d+|\D+", manifest.version)
    natural = tuple((int(p), "") if p.isdigit() else (-1, p) for p in parts)
    return manifest.created_at, natural


_KEY_METRICS = ("accuracy", "roc_auc", "roc_auc_hard", "sensitivity", "specificity", "cohen_kappa")


def _short_metrics(metrics: Mapping[str, Any]) -> str:
    """The headline metrics, in a fixed order (the rest is in ``--json``)."""
    shown = []
    for key in _KEY_METRICS:
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            shown.append(f"{key}={value:.3f}")
    if not shown:  # a model trained elsewhere: show whatever numbers it has
        shown = [
            f"{k}={v:.3g}"
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ][:4]
    return " ".join(shown) or "-"


__all__ = [
    "FRACTURE_LABELS",
    "LoadedModel",
    "ModelManifest",
    "Registry",
    "models_command",
]
