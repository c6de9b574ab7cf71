"""Evaluation of a model's predictions, overall, per body part and per fracture difficulty.

:func:`evaluate_predictions` turns labels and probabilities into the metrics of the report;
:func:`evaluate_command` (``boneflow evaluate``) runs a registered model on a data set split
and writes a report folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from boneflow.config import Settings
from boneflow.training.metrics import (
    binary_metrics,
    multiclass_metrics,
    sensitivity_at_specificity,
)
from boneflow.training.options import EvaluateOptions

log = logging.getLogger(__name__)

TARGET_SENSITIVITY = 0.90
REFERENCE_SPECIFICITY = 0.85


@dataclass(frozen=True)
class Evaluation:
    """Predictions on one split and the metrics computed from them."""

    task: str  # "router" or "fracture"
    class_names: tuple[str, ...]
    labels: npt.NDArray[np.int64]
    probabilities: npt.NDArray[np.float32]  # N x classes
    body_parts: tuple[str, ...]
    difficulties: tuple[str, ...]
    threshold: float
    metrics: dict[str, object]

    @property
    def positive_probability(self) -> npt.NDArray[np.float32]:
        """P(fracture) for a fracture model, else the top-class confidence."""
        if self.task == "fracture":
            return np.asarray(self.probabilities[:, 1], dtype=np.float32)
        return np.asarray(self.probabilities.max(axis=1), dtype=np.float32)


def evaluate_predictions(
    task: str,
    class_names: Sequence[str],
    labels: npt.ArrayLike,
    probabilities: npt.ArrayLike,
    body_parts: Sequence[str],
    difficulties: Sequence[str],
    threshold: float,
    fracture_types: Sequence[str] = (),
) -> Evaluation:
    """Metrics of a router (multi-class) or fracture model (binary at ``threshold``).

    Fracture metrics per difficulty compare the positives of that tier with all negatives,
    so that each tier's ROC-AUC answers "how well are *these* fractures told apart from
    normal images"; so do those per fracture type, when ``fracture_types`` (one per image)
    are given.
    """
    y = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probabilities, dtype=np.float32)
    parts = np.asarray(body_parts, dtype=object)
    tiers = np.asarray(difficulties, dtype=object)
    metrics: dict[str, object]
    if task == "fracture":
        p = probs[:, 1]
        metrics = binary_metrics(y, p, threshold)
        metrics["sensitivity_at_specificity_0.85"] = sensitivity_at_specificity(
            y, p, REFERENCE_SPECIFICITY
        )
        metrics["by_body_part"] = {
            part: binary_metrics(y[parts == part], p[parts == part], threshold)
            for part in sorted(set(body_parts))
        }
        by_tier: dict[str, object] = {}
        for tier in sorted({t for t, label in zip(tiers, y, strict=True) if label == 1}):
            mask = (y == 0) | ((y == 1) & (tiers == tier))
            by_tier[str(tier)] = binary_metrics(y[mask], p[mask], threshold)
        metrics["by_difficulty"] = by_tier
        if len(fracture_types) == y.size:
            kinds = np.asarray(fracture_types, dtype=object)
            metrics["by_fracture_type"] = {
                str(kind): binary_metrics(
                    y[(y == 0) | (kinds == kind)], p[(y == 0) | (kinds == kind)], threshold
                )
                for kind in sorted({k for k, label in zip(kinds, y, strict=True) if label == 1})
            }
    else:
        metrics = multiclass_metrics(y, probs, class_names)
        confidence = probs.max(axis=1)
        accepted = confidence >= threshold
        correct = probs.argmax(axis=1) == y
        metrics["threshold"] = float(threshold)
        metrics["coverage"] = float(accepted.mean()) if y.size else None
        metrics["accuracy_accepted"] = float(correct[accepted].mean()) if accepted.any() else None
    return Evaluation(
        task=task,
        class_names=tuple(class_names),
        labels=y,
        probabilities=probs,
        body_parts=tuple(body_parts),
        difficulties=tuple(difficulties),
        threshold=float(threshold),
        metrics=metrics,
    )


def summary(evaluation: Evaluation) -> dict[str, float | None]:
    """The few headline numbers (for the manifest, ``boneflow models`` and docs)."""
    m = evaluation.metrics
    if evaluation.task == "router":
        keys = ("accuracy", "macro_f1", "cohen_kappa", "coverage", "ece")
        return {k: _number(m.get(k)) for k in keys}
    out = {
        k: _number(m.get(k))
        for k in ("roc_auc", "sensitivity", "specificity", "accuracy", "f1", "cohen_kappa", "ece")
    }
    out["sensitivity_at_specificity_0.85"] = _number(m.get("sensitivity_at_specificity_0.85"))
    if "ece_uncalibrated" in m:
        out["ece_uncalibrated"] = _number(m.get("ece_uncalibrated"))
    tiers = m.get("by_difficulty")
    if isinstance(tiers, dict):
        for tier, values in tiers.items():
            if isinstance(values, dict):
                out[f"roc_auc_{tier}"] = _number(values.get("roc_auc"))
    return out


def evaluate_command(settings: Settings, options: EvaluateOptions) -> int:
    """``boneflow evaluate``: run a registered model on a split and write a report.

    Without ``--data``, a held-out synthetic test set is generated (the demo's).
    """
    from boneflow.models.registry import Registry
    from boneflow.training.report import write_report
    from boneflow.training.train import evaluate_registered

    registry = Registry(settings.resolved_model_dir)
    loaded = registry.load(options.model, options.version)
    evaluation = evaluate_registered(settings, loaded, options)
    folder = options.report_dir or (
        settings.data_dir / "reports" / f"{loaded.manifest.name}-{loaded.manifest.version}-eval"
    )
    write_report(folder, evaluation, manifest=loaded.manifest.to_dict())
    print(
        json.dumps(
            {"model": loaded.manifest.model_id, "report": str(folder), **summary(evaluation)}
        )
    )
    return 0


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
