"""Figures of a calibration results file: reliability diagrams before and after temperature scaling,
the calibration scores per output normalizer, and the training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from attnlab.figures import style
from attnlab.figures.training import draw_curves

BEFORE, AFTER = "#e15759", "#4e79a7"
SCORES = (
    ("ece_width", "ECE, equal-width bins"),
    ("ece_mass", "ECE, equal-mass bins"),
    ("brier", "Brier score"),
    ("zero_target_fraction", "targets given probability 0"),
)


def _records(payload: dict, kind: str) -> dict[str, dict]:
    return {r["output"]: r for r in payload["records"] if r.get("record") == kind}


def _outputs(payload: dict) -> list[str]:
    """Output labels in config order, those with results only."""
    found = _records(payload, "calibration")
    trained = [r["output"] for r in payload["records"] if r.get("record") == "training"]
    return [label for label in trained if label in found]


def _curve(bins: dict) -> tuple[np.ndarray, np.ndarray]:
    keep = [i for i, c in enumerate(bins["count"]) if c > 0]
    return np.array([bins["confidence"][i] for i in keep]), np.array([bins["accuracy"][i] for i in keep])


def reliability(payload: dict, out_dir: Path) -> list[Path]:
    """Per output: accuracy vs confidence (equal-width bins) before and after scaling, and the
    number of test predictions per bin underneath."""
    found = _records(payload, "calibration")
    labels = _outputs(payload)
    fig, axes = plt.subplots(
        2, len(labels), figsize=(3.0 * len(labels), 5.4), squeeze=False, height_ratios=[3, 1.2], layout="constrained"
    )
    for column, label in enumerate(labels):
        record = found[label]
        top, bottom = axes[0, column], axes[1, column]
        top.plot([0, 1], [0, 1], color="#7f7f7f", lw=1, ls=":", label="perfect calibration")
        stages = (("before", BEFORE, "as trained"), ("after", AFTER, f"T = {record['temperature']:.2f}"))
        for stage, color, name in stages:
            report = record[stage]
            confidence, accuracy = _curve(report["reliability"]["width"])
            name = f"{name}: ECE {report['ece_width']:.3f}"
            top.plot(confidence, accuracy, marker="o", ms=4, color=color, lw=1.4, label=name)
            bins = report["reliability"]["width"]
            centres = (np.array(bins["edges"][:-1]) + np.array(bins["edges"][1:])) / 2
            width = np.diff(bins["edges"]) * 0.42
            offset = -width / 2 if stage == "before" else width / 2
            bottom.bar(centres + offset, bins["count"], width=width, color=color, alpha=0.8)
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_title(label)
        top.legend(frameon=False, loc="upper left", fontsize=7.5)
        bottom.set_yscale("log")
        bottom.set_xlim(0, 1)
        bottom.set_xlabel("confidence (max probability)")
        if column == 0:
            top.set_ylabel("accuracy of the argmax")
            bottom.set_ylabel("predictions")
    test = next(iter(found.values()))["test_examples"] if found else 0
    fig.suptitle(f"Reliability of next-byte predictions ({test:,} validation positions per model)", fontsize=11)
    return style.save(fig, out_dir / f"{payload['experiment']}_reliability")


def summary(payload: dict, out_dir: Path) -> list[Path]:
    """Grouped bars per output: ECE (both binnings), Brier score and zero-probability targets, before and after."""
    found = _records(payload, "calibration")
    labels = _outputs(payload)
    x = np.arange(len(labels))
    fig, axes = plt.subplots(1, len(SCORES), figsize=(3.3 * len(SCORES), 3.8), layout="constrained")
    for ax, (key, title) in zip(axes, SCORES, strict=True):
        for stage, color, shift in (("before", BEFORE, -0.2), ("after", AFTER, 0.2)):
            values = [found[label][stage][key] for label in labels]
            name = "as trained" if stage == "before" else "temperature-scaled"
            ax.bar(x + shift, values, width=0.4, color=color, label=name)
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_title(title)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=2, frameon=False)
    temperatures = ", ".join(f"{label} {found[label]['temperature']:.2f}" for label in labels)
    fig.suptitle(f"Calibration on validation bytes; fitted T: {temperatures}", fontsize=10)
    return style.save(fig, out_dir / f"{payload['experiment']}_scores")


def training_curves(payload: dict, out_dir: Path) -> list[Path]:
    """Each model's training loss (its own output's loss, so scales differ between outputs) vs step."""
    trained = _records(payload, "training")
    colors = style.colors_for([{"name": label.split(" ")[0], "label": label} for label in trained])
    curves = [
        {
            "label": label,
            "color": colors[label],
            "steps": [h["step"] for h in record["history"]],
            "losses": [h["loss"] for h in record["history"]],
        }
        for label, record in trained.items()
    ]
    fig, axes = plt.subplots(1, len(curves), figsize=(2.8 * len(curves), 3.2), squeeze=False, layout="constrained")
    for ax, curve in zip(axes[0], curves, strict=True):
        draw_curves(ax, [curve])
        ax.set_title(curve["label"])
    axes[0, 0].set_ylabel("training loss (the output's own)")
    model, training = payload["config"]["model"], payload["config"]["training"]
    fig.suptitle(
        f"{model['layers']} layers, width {model['width']}, softmax attention; L = {training['seq_len']}, "
        f"batch {training['batch_size']}",
        fontsize=10,
    )
    return style.save(fig, out_dir / f"{payload['experiment']}_training_loss")


def render(payload: dict, out_dir: Path) -> list[Path]:
    style.setup()
    return reliability(payload, out_dir) + summary(payload, out_dir) + training_curves(payload, out_dir)
