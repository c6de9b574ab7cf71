"""The report folder of a training or evaluation run: metrics.json, PNG plots, model_card.md."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from boneflow.training.evaluate import Evaluation, summary
from boneflow.training.metrics import calibration, roc_points

log = logging.getLogger(__name__)

NOT_FOR_DIAGNOSTIC_USE = "Not for diagnostic use."


def write_report(
    folder: Path,
    evaluation: Evaluation,
    history: Sequence[Mapping[str, float]] = (),
    manifest: Mapping[str, object] | None = None,
    data: Mapping[str, object] | None = None,
) -> list[Path]:
    """Write metrics.json, roc.png, confusion.png, calibration.png, learning_curves.png and
    model_card.md into ``folder``.

    Returns:
        The files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "metrics.json"]
    payload = {
        "task": evaluation.task,
        "labels": list(evaluation.class_names),
        "threshold": evaluation.threshold,
        "summary": summary(evaluation),
        "metrics": evaluation.metrics,
        "history": [dict(h) for h in history],
        "data": dict(data or {}),
        "model": dict(manifest or {}),
    }
    written[0].write_text(json.dumps(payload, indent=2, default=_jsonable))
    written.append(_plot_roc(folder / "roc.png", evaluation))
    written.append(_plot_confusion(folder / "confusion.png", evaluation))
    written.append(_plot_calibration(folder / "calibration.png", evaluation))
    written.append(_plot_history(folder / "learning_curves.png", history))
    card = folder / "model_card.md"
    card.write_text(model_card(evaluation, history, manifest or {}, data or {}))
    written.append(card)
    log.info("report written to %s", folder)
    return written


def model_card(
    evaluation: Evaluation,
    history: Sequence[Mapping[str, float]],
    manifest: Mapping[str, object],
    data: Mapping[str, object],
) -> str:
    """A Markdown model card: what the model is, on what data, how well, and its limits."""
    name = f"{manifest.get('name', 'model')}@{manifest.get('version', '?')}"
    training = manifest.get("training", {})
    target = training.get("target_sensitivity", 0.9) if isinstance(training, dict) else 0.9
    covered = manifest.get("body_parts", ())
    parts = ", ".join(str(p) for p in covered) if isinstance(covered, list | tuple) else ""
    lines = [
        f"# Model card: {name}",
        "",
        f"**{NOT_FOR_DIAGNOSTIC_USE}** Research and demonstration software.",
        "",
        "## Model",
        "",
        f"- task: {evaluation.task}",
        f"- architecture: {manifest.get('architecture', '?')} "
        f"({manifest.get('input_size', '?')} px, 1 channel)",
        f"- outputs: {', '.join(evaluation.class_names)}",
        f"- body parts covered: {parts}",
        f"- operating threshold: {evaluation.threshold:.4f} "
        + (
            f"(P(fracture), chosen on validation for sensitivity {target})"
            if evaluation.task == "fracture"
            else "(minimum router confidence to accept a body part)"
        ),
        *_calibration_line(manifest),
        f"- preprocessing: {json.dumps(manifest.get('preprocessing', {}))}",
        f"- data fingerprint: `{manifest.get('data_fingerprint', '')}`",
        "",
        "## Data",
        "",
        f"- source: {data.get('source', '?')}",
        f"- images per split: {json.dumps(data.get('split_counts', {}))}",
        f"- patients per split: {json.dumps(data.get('patients', {}))} (no patient in two splits)",
        f"- corrupt files dropped: {data.get('corrupt_count', 0)}; "
        f"duplicates dropped: {data.get('duplicate_count', 0)}",
        "",
        f"## Results on the test split (n = {evaluation.metrics.get('n')})",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in summary(evaluation).items()]
    lines += _breakdown(evaluation)
    if history:
        best = max(history, key=lambda h: h.get("val_auc", h.get("val_accuracy", 0.0)))
        lines += [
            "",
            "## Training",
            "",
            f"- epochs run: {len(history)}; best epoch: {int(best.get('epoch', 0))}",
            f"- hyper-parameters: {json.dumps(manifest.get('training', {}), default=str)}",
        ]
    lines += [
        "",
        "## Limits",
        "",
        "- Metrics hold only for data like the test split; a new scanner, population or "
        "protocol needs its own evaluation (`boneflow evaluate`).",
        "- Synthetic training data (the demo models) does not make a model fit for real "
        "radiographs.",
        "- The threshold trades sensitivity for specificity; it was fixed on validation data "
        "before the test split was seen.",
        *(
            [
                "- P(fracture) is calibrated to the validation split's share of fractures; "
                "where fractures are rarer, the same number overstates the risk."
            ]
            if manifest.get("calibration")
            else []
        ),
        "",
    ]
    return "\n".join(lines)


def _calibration_line(manifest: Mapping[str, object]) -> list[str]:
    scaling = manifest.get("calibration")
    if not isinstance(scaling, Mapping) or not scaling:
        return []
    lines = [
        "- probability calibration: Platt scaling fitted on validation, P = sigmoid("
        f"{_platt_text(scaling)}) of the network's p"
    ]
    by_part = manifest.get("calibration_by_part")
    if isinstance(by_part, Mapping) and by_part:
        lines.append(
            "- body parts calibrated on their own (their validation images, pulled towards "
            "the line above): "
            + "; ".join(f"{part}: {_platt_text(s)}" for part, s in sorted(by_part.items()))
        )
    return lines


def _platt_text(scaling: Mapping[str, float]) -> str:
    offset = float(scaling["offset"])
    sign = "-" if offset < 0 else "+"
    return f"{float(scaling['scale']):.4f} * logit(p) {sign} {abs(offset):.4f}"


# ---- plots ------------------------------------------------------------------------------


def _plot_roc(path: Path, evaluation: Evaluation) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    if evaluation.task == "fracture":
        curves = [("all", evaluation.labels, evaluation.probabilities[:, 1])]
        tiers = sorted(
            {d for d, y in zip(evaluation.difficulties, evaluation.labels, strict=True) if y}
        )
        for tier in tiers:
            mask = np.array(
                [
                    y == 0 or d == tier
                    for d, y in zip(evaluation.difficulties, evaluation.labels, strict=True)
                ]
            )
            curves.append((tier, evaluation.labels[mask], evaluation.probabilities[mask, 1]))
    else:
        curves = [
            (name, (evaluation.labels == i).astype(np.int64), evaluation.probabilities[:, i])
            for i, name in enumerate(evaluation.class_names)
        ]
    for name, y, p in curves:
        fpr, tpr = roc_points(y, p)
        if fpr.size:
            ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (test)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)


def _plot_confusion(path: Path, evaluation: Evaluation) -> Path:
    import matplotlib.pyplot as plt

    matrix = np.asarray(evaluation.metrics.get("confusion", [[0]]), dtype=np.int64)
    names = evaluation.class_names
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(names), 1.0 + 0.7 * len(names)))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        colour = "white" if value > matrix.max() / 2 else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=colour, fontsize="small")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize="small")
    ax.set_yticks(range(len(names)), names, fontsize="small")
    ax.set(xlabel="predicted", ylabel="true", title="confusion (test)")
    return _save(fig, path)


def _plot_calibration(path: Path, evaluation: Evaluation) -> Path:
    import matplotlib.pyplot as plt

    if evaluation.task == "fracture":
        y, p = evaluation.labels, evaluation.probabilities[:, 1]
    else:
        p = evaluation.probabilities.max(axis=1)
        y = (evaluation.probabilities.argmax(axis=1) == evaluation.labels).astype(np.int64)
    ece, table = calibration(y, p)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.plot([b["confidence"] for b in table], [b["observed"] for b in table], marker="o")
    ax.set(
        xlabel="predicted probability",
        ylabel="observed frequency",
        title=f"reliability (ECE {ece:.3f})",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    return _save(fig, path)


def _plot_history(path: Path, history: Sequence[Mapping[str, float]]) -> Path:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    for key in ("train_loss", "val_loss"):
        left.plot(epochs, [h.get(key, np.nan) for h in history], label=key, marker=".")
    for key in ("val_auc", "val_accuracy"):
        if any(key in h for h in history):
            right.plot(epochs, [h.get(key, np.nan) for h in history], label=key, marker=".")
    left.set(xlabel="epoch", title="loss")
    right.set(xlabel="epoch", title="validation")
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if not history:
        left.set_title("loss (no training history: evaluation only)")
    return _save(fig, path)


def _save(fig: object, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(path, dpi=100)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return path


def _breakdown(evaluation: Evaluation) -> list[str]:
    lines: list[str] = []
    sections = (
        ("by_body_part", "Per body part"),
        ("by_difficulty", "Per fracture difficulty"),
        ("by_fracture_type", "Per fracture type (that type's fractures against all normals)"),
    )
    for key, title in sections:
        groups = evaluation.metrics.get(key)
        if not isinstance(groups, dict) or not groups:
            continue
        lines += ["", f"### {title}", "", "| group | n | ROC-AUC | sensitivity | specificity |"]
        lines.append("|---|---|---|---|---|")
        for group, m in groups.items():
            lines.append(
                f"| {group} | {m.get('n')} | {_fmt(m.get('roc_auc'))} | "
                f"{_fmt(m.get('sensitivity'))} | {_fmt(m.get('specificity'))} |"
            )
    per_class = evaluation.metrics.get("per_class")
    if isinstance(per_class, dict):
        lines += [
            "",
            "### Per body part",
            "",
            "| part | n | precision | recall |",
            "|---|---|---|---|",
        ]
        for name, m in per_class.items():
            lines.append(
                f"| {name} | {int(m['n'])} | {_fmt(m['precision'])} | {_fmt(m['recall'])} |"
            )
    return lines


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "n/a" if value is None else str(value)


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
