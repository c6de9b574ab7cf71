"""Metrics: threshold choice, binary and multi-class metrics, calibration, per-group breakdown."""

from __future__ import annotations

import numpy as np
import pytest

from boneflow.training.evaluate import evaluate_predictions, summary
from boneflow.training.metrics import (
    binary_metrics,
    calibration,
    choose_threshold,
    fit_part_platt,
    fit_platt,
    multiclass_metrics,
    sensitivity_at_specificity,
)


def test_threshold_reaches_the_target_sensitivity_and_no_more_than_needed() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, 500), 0, 1)
    threshold = choose_threshold(y, p, 0.90)
    sensitivity = float(((p >= threshold) & (y == 1)).sum() / (y == 1).sum())
    assert sensitivity >= 0.90
    # a slightly higher threshold would miss the target: it is the highest that reaches it
    higher = np.min(p[(y == 1) & (p > threshold)])
    assert ((p >= higher) & (y == 1)).sum() / (y == 1).sum() < 0.90
    assert choose_threshold([0, 0], [0.1, 0.2]) == 0.5


def test_binary_metrics_match_a_hand_counted_confusion() -> None:
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p = [0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.1, 0.3, 0.2, 0.05]
    m = binary_metrics(y, p, threshold=0.5)
    assert m["confusion"] == [[5, 1], [1, 3]]  # tn fp / fn tp
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["f1"] == pytest.approx(0.75)
    assert m["roc_auc"] == pytest.approx(21.5 / 24)  # one tie at 0.2 counts half
    assert m["cohen_kappa"] == pytest.approx((0.8 - 0.52) / 0.48)
    assert sensitivity_at_specificity(y, p, 0.85) == pytest.approx(0.75)


def test_one_class_only_gives_no_auc_instead_of_an_error() -> None:
    m = binary_metrics([0, 0, 0], [0.1, 0.7, 0.2], 0.5)
    assert m["roc_auc"] is None and m["specificity"] == pytest.approx(2 / 3)
    assert m["sensitivity"] is None


def test_calibration_of_calibrated_and_overconfident_predictions() -> None:
    rng = np.random.default_rng(1)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)
    ece, table = calibration(y, p)
    assert ece < 0.02 and len(table) == 10
    overconfident, _ = calibration(y, np.where(p > 0.5, 1.0, 0.0))
    assert overconfident > 0.2


def test_platt_scaling_recovers_a_known_miscalibration() -> None:
    """A network that is overconfident and leans positive: the truth is sigmoid(z/2 - 1)."""
    from sklearn.metrics import roc_auc_score

    from boneflow.models.registry import platt

    rng = np.random.default_rng(7)
    z = rng.normal(0.0, 3.0, 40000)
    raw = 1.0 / (1.0 + np.exp(-z))
    y = (rng.random(z.size) < 1.0 / (1.0 + np.exp(-(0.5 * z - 1.0)))).astype(int)
    scale, offset = fit_platt(y, raw)
    assert scale == pytest.approx(0.5, abs=0.03) and offset == pytest.approx(-1.0, abs=0.06)
    calibrated = platt(raw, scale, offset)
    before, _ = calibration(y, raw)
    after, _ = calibration(y, calibrated)
    assert before > 0.1 and after < 0.015
    assert roc_auc_score(y, calibrated) == pytest.approx(roc_auc_score(y, raw))  # monotone
    # nothing to fit on one class; a model that is wrong way round is not "calibrated"
    assert fit_platt([1, 1, 1], [0.2, 0.6, 0.9]) == (1.0, 0.0)
    assert fit_platt([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == (1.0, 0.0)


def test_multiclass_metrics() -> None:
    y = [0, 0, 1, 1, 2, 2]
    probs = np.eye(3)[[0, 0, 1, 2, 2, 2]] * 0.8 + 0.2 / 3
    m = multiclass_metrics(y, probs, ("a", "b", "c"))
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["confusion"] == [[2, 0, 0], [0, 1, 1], [0, 0, 2]]
    per_class = m["per_class"]
    assert isinstance(per_class, dict)
    assert per_class["b"]["recall"] == pytest.approx(0.5)
    assert per_class["c"]["precision"] == pytest.approx(2 / 3)


def test_fracture_breakdown_by_difficulty_compares_each_tier_with_all_negatives() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.35, 0.15])
    tiers = ["none"] * 4 + ["easy", "easy", "hard", "hard"]
    parts = ["hand", "wrist"] * 4
    evaluation = evaluate_predictions(
        "fracture", ("no_fracture", "fracture"), y, np.stack([1 - p, p], 1), parts, tiers, 0.5
    )
    by_tier = evaluation.metrics["by_difficulty"]
    assert isinstance(by_tier, dict)
    assert by_tier["easy"]["roc_auc"] == pytest.approx(1.0)
    assert by_tier["hard"]["roc_auc"] == pytest.approx(4 / 8)
    assert set(evaluation.metrics["by_body_part"]) == {"hand", "wrist"}  # type: ignore[arg-type]
    headline = summary(evaluation)
    assert headline["roc_auc_hard"] == pytest.approx(4 / 8)
    assert headline["sensitivity"] == pytest.approx(0.5)
    assert "by_fracture_type" not in evaluation.metrics  # the data did not name types


def test_fracture_breakdown_by_type_compares_each_type_with_all_negatives() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.35, 0.15, 0.6])
    kinds = ["none"] * 4 + ["buckle", "buckle", "hairline", "hairline", "oblique"]
    evaluation = evaluate_predictions(
        "fracture",
        ("no_fracture", "fracture"),
        y,
        np.stack([1 - p, p], 1),
        ["hand"] * 9,
        ["none"] * 4 + ["easy"] * 5,
        0.5,
        kinds,
    )
    by_type = evaluation.metrics["by_fracture_type"]
    assert isinstance(by_type, dict) and set(by_type) == {"buckle", "hairline", "oblique"}
    assert by_type["buckle"]["roc_auc"] == pytest.approx(1.0)
    assert by_type["hairline"]["roc_auc"] == pytest.approx(4 / 8)
    assert (by_type["hairline"]["n"], by_type["hairline"]["sensitivity"]) == (6, 0.0)
    assert (by_type["oblique"]["n"], by_type["oblique"]["sensitivity"]) == (5, 1.0)


def test_router_summary_reports_coverage_at_the_threshold() -> None:
    probs = np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8], [0.4, 0.6]])
    evaluation = evaluate_predictions(
        "router", ("hand", "other"), [0, 0, 1, 0], probs, ["hand"] * 4, ["none"] * 4, 0.7
    )
    assert evaluation.metrics["accuracy"] == pytest.approx(0.75)
    assert evaluation.metrics["coverage"] == pytest.approx(0.5)
    assert evaluation.metrics["accuracy_accepted"] == pytest.approx(1.0)


def test_body_parts_on_different_scales_are_calibrated_each_on_its_own() -> None:
    """One network, two parts: the same evidence means a fracture less often on a shoulder."""
    from sklearn.metrics import roc_auc_score

    from boneflow.models.registry import calibrated, platt

    rng = np.random.default_rng(11)
    n = 1000
    parts = np.array(["forearm"] * n + ["shoulder"] * n + ["hand"] * 12)
    z = rng.normal(0.0, 2.0, parts.size)
    shift = np.select([parts == "shoulder", parts == "hand"], [-2.5, 1.0], 0.0)
    y = (rng.random(parts.size) < 1.0 / (1.0 + np.exp(-(z + shift)))).astype(int)
    raw = 1.0 / (1.0 + np.exp(-z))
    scale, offset = fit_platt(y, raw)
    model_wide = {"scale": scale, "offset": offset}
    by_part = fit_part_platt(y, raw, list(parts), model_wide)
    # a dozen hand images are too few to fit on their own: the model-wide scaling serves
    assert set(by_part) == {"forearm", "shoulder"}
    # the shoulder's own offset is ~2.5 lower than the forearm's, its scale about the same
    gap = by_part["forearm"]["offset"] - by_part["shoulder"]["offset"]
    assert gap == pytest.approx(2.5, abs=0.4)
    assert by_part["shoulder"]["scale"] == pytest.approx(by_part["forearm"]["scale"], abs=0.2)
    p = calibrated(raw, list(parts), model_wide, by_part)
    shared = platt(raw, scale, offset)
    for part in ("forearm", "shoulder"):
        own, _ = calibration(y[parts == part], p[parts == part])
        pooled, _ = calibration(y[parts == part], shared[parts == part])
        assert own < 0.03 < pooled
    assert np.array_equal(p[parts == "hand"], shared[parts == "hand"])
    # per-part scales put the parts in one order: the pooled ranking improves too
    assert roc_auc_score(y, p) > roc_auc_score(y, shared) + 0.02
    # within a part the map is monotone: its own ROC-AUC does not change
    shoulder = parts == "shoulder"
    assert roc_auc_score(y[shoulder], p[shoulder]) == pytest.approx(
        roc_auc_score(y[shoulder], raw[shoulder])
    )
