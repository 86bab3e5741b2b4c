"""Figures of a distillation results file: the students' validation loss against the temperature,
beside the student trained alone and the teacher, and every model's curves over training."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from attnlab.figures import style
from attnlab.figures.training import draw_curves

TEACHER_COLOR, BASELINE_COLOR = "#000000", "#7f7f7f"
BASELINE_DASH = (0, (1, 1.5))
# Students: colour by T, line style by w (so curves of one T differ only in their dashes).
WEIGHT_DASHES = ["-", "--", "-.", (0, (5, 1, 1, 1, 1, 1))]
STUDENT_COLORMAP = "plasma"
WEIGHT_COLORS = ["#e15759", "#4e79a7", "#59a14f", "#f28e2b", "#b07aa1", "#9c755f"]


def _by_model(payload: dict) -> tuple[dict | None, dict | None, list[dict]]:
    """(teacher record, baseline record, distilled students in config order of weight then T)."""
    records = [r for r in payload["records"] if r.get("record") == "training"]
    teacher = next((r for r in records if r["model"] == "teacher"), None)
    baseline = next((r for r in records if r["model"] == "baseline"), None)
    config = payload["config"]
    order = {(w, t): i for i, (w, t) in enumerate((w, t) for w in config["weights"] for t in config["temperatures"])}
    students = sorted(
        (r for r in records if r["model"] == "student"), key=lambda r: order.get((r["weight"], r["temperature"]), -1)
    )
    return teacher, baseline, students


def _shape(setting: dict) -> str:
    layers = setting["layers"]
    return f"{layers} layer{'s' if layers != 1 else ''} × width {setting['width']}"


def _student_label(record: dict, weights: list[float]) -> str:
    label = f"student, T = {record['temperature']:g}"
    return label if len(weights) == 1 else f"{label}, w = {record['weight']:g}"


def _student_colors(students: list[dict]) -> list[str]:
    """One colour per distinct T (light to dark as T grows), shared across weights."""
    temperatures = sorted({r["temperature"] for r in students})
    cmap = plt.get_cmap(STUDENT_COLORMAP)
    shade = {t: cmap(0.05 + 0.7 * i / max(1, len(temperatures) - 1)) for i, t in enumerate(temperatures)}
    return [shade[r["temperature"]] for r in students]


def _curves(models: list[tuple[dict, str, str, object]], series: str) -> list[dict]:
    """One `draw_curves` curve per (record, label, colour, line style): loss vs step from record[series]."""
    return [
        {
            "label": label,
            "color": color,
            "ls": dash,
            "steps": [entry["step"] for entry in record[series]],
            "losses": [entry["loss"] for entry in record[series]],
        }
        for record, label, color, dash in models
    ]


def temperature_sweep(payload: dict, out_dir: Path) -> list[Path]:
    """Left: the distilled students' validation loss vs T (log2 axis), one line per weight, with
    the student trained alone and the teacher as horizontal lines. Right: the gain over the
    student trained alone (baseline - student, nats per byte; > 0: the teacher helped)."""
    config, name = payload["config"], payload["experiment"]
    teacher, baseline, students = _by_model(payload)
    fig, (loss_ax, gain_ax) = plt.subplots(1, 2, figsize=(11.0, 4.2), layout="constrained")
    for i, weight in enumerate(config["weights"]):
        rows = sorted((r for r in students if r["weight"] == weight), key=lambda r: r["temperature"])
        if not rows:
            continue
        x = np.array([r["temperature"] for r in rows])
        y = np.array([r["validation_loss"] for r in rows])
        best = int(np.argmin(y))
        label = f"distilled student, w = {weight:g} (best T = {x[best]:g}: {y[best]:.3f})"
        look = {"marker": style.MARKERS[i % len(style.MARKERS)], "color": WEIGHT_COLORS[i % len(WEIGHT_COLORS)]}
        loss_ax.plot(x, y, lw=1.6, label=label, **look)
        if baseline is not None:
            gain_ax.plot(x, baseline["validation_loss"] - y, lw=1.6, label=label, **look)
    if baseline is not None:
        loss = baseline["validation_loss"]
        loss_ax.axhline(loss, color=BASELINE_COLOR, ls="--", lw=1.2, label=f"student alone (no teacher): {loss:.3f}")
        gain_ax.axhline(0.0, color=BASELINE_COLOR, ls="--", lw=1.2, label="student alone (no teacher)")
    if teacher is not None:
        loss = teacher["validation_loss"]
        loss_ax.axhline(loss, color=TEACHER_COLOR, ls=":", lw=1.2, label=f"teacher: {loss:.3f}")
    for ax in (loss_ax, gain_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(config["temperatures"], [f"{t:g}" for t in config["temperatures"]])
        ax.minorticks_off()
        ax.set_xlabel("distillation temperature T (log scale)")
        ax.legend(frameon=False, fontsize=8)
    loss_ax.set_ylabel("validation loss (cross-entropy, nats per byte)")
    loss_ax.set_title("Validation loss")
    gain_ax.set_ylabel("student alone − distilled student (nats per byte)")
    gain_ax.set_title("Gain from the teacher (> 0: distillation helped)")
    training = config["student_training"]
    fig.suptitle(
        f"Distillation from a {_shape(config['teacher'])} teacher into a {_shape(config['student'])} student "
        f"({training['steps']} steps, batch {training['batch_size']} × {training['seq_len']} bytes; "
        f"loss on {config['eval_windows']} validation windows)",
        fontsize=10,
    )
    return style.save(fig, out_dir / f"{name}_temperature")


def training_curves(payload: dict, out_dir: Path) -> list[Path]:
    """Left: validation cross-entropy vs step for every model (comparable across models). Right:
    each model's training objective vs step (cross-entropy for the teacher and the student
    alone; (1 - w) CE + w T^2 KL for a distilled student, so its scale depends on T and w)."""
    config, name = payload["config"], payload["experiment"]
    teacher, baseline, students = _by_model(payload)
    models = []
    if teacher is not None:
        models.append((teacher, f"teacher ({_shape(config['teacher'])})", TEACHER_COLOR, "-"))
    if baseline is not None:
        models.append((baseline, "student alone (no teacher)", BASELINE_COLOR, BASELINE_DASH))
    dash = {w: WEIGHT_DASHES[i % len(WEIGHT_DASHES)] for i, w in enumerate(config["weights"])}
    for record, color in zip(students, _student_colors(students), strict=True):
        models.append((record, _student_label(record, config["weights"]), color, dash[record["weight"]]))
    validation, objective = _curves(models, "evaluations"), _curves(models, "history")
    fig, (val_ax, train_ax) = plt.subplots(1, 2, figsize=(12.5, 4.4), layout="constrained")
    draw_curves(val_ax, validation)
    draw_curves(train_ax, objective)
    handles, labels = val_ax.get_legend_handles_labels()
    for ax in (val_ax, train_ax):
        ax.get_legend().remove()
    fig.legend(handles, labels, loc="outside right upper", frameon=False, fontsize=8)
    val_ax.set_ylabel("validation loss (cross-entropy, nats per byte)")
    val_ax.set_title(f"Validation loss, every {config['eval_every']} steps" if config["eval_every"] else "Validation")
    train_ax.set_ylabel("training loss (nats per byte, mean since the last entry)")
    train_ax.set_title("Training objective: CE, or (1 − w) CE + w T² KL (distilled)", fontsize=10)
    fig.suptitle(
        f"Teacher: {_shape(config['teacher'])}, {config['teacher_training']['steps']} steps; "
        f"students: {_shape(config['student'])}, {config['student_training']['steps']} steps",
        fontsize=10,
    )
    return style.save(fig, out_dir / f"{name}_training")


def render(payload: dict, out_dir: Path) -> list[Path]:
    style.setup()
    return temperature_sweep(payload, out_dir) + training_curves(payload, out_dir)
