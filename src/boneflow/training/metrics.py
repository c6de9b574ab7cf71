"""Evaluation metrics: binary (fracture) and multi-class (router), calibration, thresholds.

Pure numpy/scikit-learn on labels and probabilities, so that they are easy to test and the
same numbers land in the report, the manifest and docs/models.md. Platt scaling is fitted
here and applied by :func:`boneflow.models.registry.platt` (its ``logit`` is shared), so
that training and inference compute the calibrated probability the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
from sklearn.metrics import cohen_kappa_score, confusion_matrix, roc_auc_score, roc_curve

from boneflow.models.registry import logit, platt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

PART_CALIBRATION_MIN = 10  # fractured and normal validation images a part needs for its own
PART_CALIBRATION_RIDGE = 5.0  # pull of a part's fit towards the model-wide calibration


def choose_threshold(
    labels: npt.ArrayLike, probabilities: npt.ArrayLike, target_sensitivity: float = 0.90
) -> float:
    """The highest threshold on P(positive) that reaches ``target_sensitivity``.

    Chosen on validation data, then applied unchanged to the test set. With no positive
    case the threshold is 0.5.
    """
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    positives = np.sort(p[y == 1])
    if positives.size == 0:
        return 0.5
    # at threshold t, sensitivity = share of positives with p >= t
    allowed_misses = math.floor((1.0 - target_sensitivity) * positives.size + 1e-9)
    threshold = float(positives[min(allowed_misses, positives.size - 1)])
    return float(np.clip(threshold, 1e-6, 1.0))


def fit_platt(
    labels: npt.ArrayLike, probabilities: npt.ArrayLike, ridge: float | None = None
) -> tuple[float, float]:
    """Platt scaling of a binary model, fitted on validation: ``(scale, offset)``.

    The calibrated probability is ``sigmoid(scale * logit(p) + offset)`` (see
    :func:`boneflow.models.registry.platt`): a monotone map, so ROC-AUC, sensitivity and
    specificity at the correspondingly moved threshold do not change, only what the number
    means. Maximum likelihood by Newton's method, on Platt's smoothed targets and with a
    light pull towards the identity (so a small or separable validation set cannot send the
    scale to infinity; ``ridge``, its weight, is 0.001 per image unless given). The
    identity ``(1.0, 0.0)`` when a class is missing or the fit would not be increasing.
    """
    y = np.asarray(labels, dtype=np.float64)
    z = logit(probabilities)
    if y.size == 0 or y.min() == y.max():
        return 1.0, 0.0
    # Platt's smoothed targets: a separable validation set does not ask for certainty
    positives = float(y.sum())
    negatives = float(y.size) - positives
    y = np.where(y > 0.5, (positives + 1.0) / (positives + 2.0), 1.0 / (negatives + 2.0))
    x = np.stack([z, np.ones_like(z)], axis=1)
    identity = np.array([1.0, 0.0])
    ridge = 1e-3 * y.size if ridge is None else ridge

    def loss(w: FloatArray) -> float:
        a = x @ w  # cross-entropy of sigmoid(a), stable for large |a|
        penalty = 0.5 * ridge * float(np.sum((w - identity) ** 2))
        return float(np.sum(np.logaddexp(0.0, a) - y * a)) + penalty

    w = identity.copy()
    current = loss(w)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -500.0, 500.0)))
        gradient = x.T @ (p - y) + ridge * (w - identity)
        hessian = (x * (p * (1.0 - p))[:, None]).T @ x + ridge * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        shrink = 1.0  # backtracking: Newton's full step can overshoot
        while shrink > 1e-6 and loss(w - shrink * step) > current:
            shrink /= 2.0
        w = w - shrink * step
        current = loss(w)
        if float(np.abs(shrink * step).max()) < 1e-9:
            break
    scale, offset = float(w[0]), float(w[1])
    if not (math.isfinite(scale) and math.isfinite(offset)) or scale <= 0.0:
        return 1.0, 0.0
    return scale, offset


def fit_part_platt(
    labels: npt.ArrayLike,
    raw: npt.ArrayLike,
    body_parts: Sequence[str],
    model_wide: Mapping[str, float],
    min_each: int | None = None,
) -> dict[str, dict[str, float]]:
    """Platt scaling per body part, on top of the model-wide one: ``{part: scaling}``.

    ``raw`` are the network's own validation probabilities and ``model_wide`` their
    :func:`fit_platt` scaling. Each part with at least ``min_each`` fractured and
    ``min_each`` normal validation images (default :data:`PART_CALIBRATION_MIN`) gets a
    second fit on its model-wide calibrated P, pulled towards the model-wide calibration
    (``ridge`` 5: a part's few dozen images move it only as far as they clearly
    disagree); the two maps are composed into one ``{"scale", "offset"}`` of the
    network's own probability, as the manifest stores it. A part whose second fit is the
    identity gets no entry.
    """
    least = PART_CALIBRATION_MIN if min_each is None else min_each
    y = np.asarray(labels, dtype=np.int64)
    a1, b1 = float(model_wide.get("scale", 1.0)), float(model_wide.get("offset", 0.0))
    p = platt(raw, a1, b1)
    parts = np.asarray(body_parts)
    out: dict[str, dict[str, float]] = {}
    for part in sorted(set(parts.tolist())):
        chosen = parts == part
        positives = int(y[chosen].sum())
        if min(positives, int(chosen.sum()) - positives) < least:
            continue
        a2, b2 = fit_platt(y[chosen], p[chosen], ridge=PART_CALIBRATION_RIDGE)
        if (a2, b2) != (1.0, 0.0):
            out[str(part)] = {"scale": a2 * a1, "offset": a2 * b1 + b2}
    return out


def binary_metrics(
    labels: npt.ArrayLike, probabilities: npt.ArrayLike, threshold: float
) -> dict[str, object]:
    """Accuracy, precision, recall/sensitivity, specificity, F1, ROC-AUC, kappa, ECE.

    ``roc_auc`` is ``None`` when only one class is present.
    """
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    predicted = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, predicted, labels=[0, 1]).ravel())
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    both = len(np.unique(y)) == 2
    ece, _ = calibration(y, p)
    return {
        "n": int(y.size),
        "positives": int(tp + fn),
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, y.size),
        "precision": precision,
        "recall": recall,
        "sensitivity": recall,
        "specificity": _ratio(tn, tn + fp),
        "f1": f1,
        "roc_auc": float(roc_auc_score(y, p)) if both else None,
        "cohen_kappa": _kappa(y, predicted),
        "ece": ece,
        "confusion": [[tn, fp], [fn, tp]],
    }


def multiclass_metrics(
    labels: npt.ArrayLike, probabilities: npt.ArrayLike, class_names: Sequence[str]
) -> dict[str, object]:
    """Accuracy, macro precision/recall/F1, per-class recall, kappa, macro ROC-AUC, ECE."""
    y = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probabilities, dtype=np.float64)
    predicted = probs.argmax(axis=1)
    k = len(class_names)
    matrix = confusion_matrix(y, predicted, labels=list(range(k)))
    per_class: dict[str, dict[str, float | None]] = {}
    for i, name in enumerate(class_names):
        tp = int(matrix[i, i])
        per_class[name] = {
            "n": float(matrix[i].sum()),
            "precision": _ratio(tp, int(matrix[:, i].sum())),
            "recall": _ratio(tp, int(matrix[i].sum())),
        }
    present = [i for i in range(k) if matrix[i].sum() > 0]
    aucs = [
        float(roc_auc_score(y == i, probs[:, i])) for i in present if 0 < (y == i).sum() < y.size
    ]
    ece, _ = calibration((predicted == y).astype(np.int64), probs.max(axis=1))
    macro = [per_class[class_names[i]] for i in present]
    return {
        "n": int(y.size),
        "accuracy": _ratio(int((predicted == y).sum()), y.size),
        "macro_precision": _mean([m["precision"] for m in macro]),
        "macro_recall": _mean([m["recall"] for m in macro]),
        "macro_f1": _mean([_f1(m["precision"], m["recall"]) for m in macro]),
        "macro_roc_auc": _mean(aucs),
        "cohen_kappa": _kappa(y, predicted),
        "ece": ece,
        "per_class": per_class,
        "confusion": matrix.astype(int).tolist(),
    }


def calibration(
    labels: npt.ArrayLike, probabilities: npt.ArrayLike, bins: int = 10
) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error and the reliability table (equal-width bins).

    Returns:
        ECE, and per non-empty bin its range, count, mean confidence and observed frequency.
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    table: list[dict[str, float]] = []
    ece = 0.0
    for b in range(bins):
        mask = index == b
        if not mask.any():
            continue
        confidence, observed = float(p[mask].mean()), float(y[mask].mean())
        ece += mask.sum() / max(y.size, 1) * abs(confidence - observed)
        table.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": float(mask.sum()),
                "confidence": confidence,
                "observed": observed,
            }
        )
    return float(ece), table


def roc_points(
    labels: npt.ArrayLike, probabilities: npt.ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """False- and true-positive rates of the ROC curve (empty when one class only)."""
    y = np.asarray(labels, dtype=np.int64)
    if len(np.unique(y)) < 2:
        return np.zeros(0), np.zeros(0)
    fpr, tpr, _ = roc_curve(y, np.asarray(probabilities, dtype=np.float64))
    return np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)


def sensitivity_at_specificity(
    labels: npt.ArrayLike, probabilities: npt.ArrayLike, specificity: float
) -> float | None:
    """Best sensitivity among thresholds whose specificity is at least ``specificity``."""
    fpr, tpr = roc_points(labels, probabilities)
    if fpr.size == 0:
        return None
    ok = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def _kappa(y: IntArray, predicted: IntArray) -> float | None:
    if len(np.unique(np.concatenate([y, predicted]))) < 2:
        return None
    value = float(cohen_kappa_score(y, predicted))
    return value if math.isfinite(value) else None


def _ratio(numerator: int | float, denominator: int | float) -> float | None:
    return float(numerator) / float(denominator) if denominator else None


def _f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None or precision + recall == 0:
        return None if precision is None or recall is None else 0.0
    return 2 * precision * recall / (precision + recall)


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None
