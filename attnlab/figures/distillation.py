"""Figures of a distillation results file: the students' validation loss against the temperature,
beside the student trained alone and the teacher, and every model's curves over training.

Losses are each model's mean over the seeds with its 95% t interval (error bars, or a band for
the student alone and the teacher), and the gain from the teacher is the paired difference to
the student alone on the same seeds; they come from the results file's "summary" (written when
the sweep finished) or, for a run still in progress, from its records the same way. Curves are
the mean over seeds with their 95% t band. A file of one seed (or written before seeds were
swept: its records are seed 0) is drawn as that one run, without intervals.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from attnlab.experiments import distillation
from attnlab.figures import bands, style
from attnlab.figures.findings import (
    Finding,
    Row,
    comparison_text,
    one_seed,
    seed_count,
    seeds_text,
    significance,
    value_text,
)
from attnlab.figures.training import draw_curves, seed_curve

TEACHER_COLOR, BASELINE_COLOR = "#000000", "#7f7f7f"
BASELINE_DASH = (0, (1, 1.5))
# Students: colour by T, line style by w (so curves of one T differ only in their dashes).
WEIGHT_DASHES = ["-", "--", "-.", (0, (5, 1, 1, 1, 1, 1))]
STUDENT_COLORMAP = "plasma"
WEIGHT_COLORS = ["#e15759", "#4e79a7", "#59a14f", "#f28e2b", "#b07aa1", "#9c755f"]


def _by_model(payload: dict) -> tuple[list[dict], list[dict], list[list[dict]]]:
    """(the teacher's records, the baseline's, and each distilled student's in config order of
    weight then T): one record per seed each."""
    records = [r for r in payload["records"] if r.get("record") == "training"]
    teacher = [r for r in records if r["model"] == "teacher"]
    baseline = [r for r in records if r["model"] == "baseline"]
    config = payload["config"]
    order = [(w, t) for w in config["weights"] for t in config["temperatures"]]
    students = [
        runs
        for w, t in order
        if (runs := [r for r in records if r["model"] == "student" and (r["weight"], r["temperature"]) == (w, t)])
    ]
    return teacher, baseline, students


def _summary(payload: dict) -> dict:
    """The results file's summary, or the same computed from its records (a run in progress)."""
    summary = payload.get("summary")
    return summary if summary is not None else distillation.summary_of(payload["records"])


def _entry(entries: list[dict], model: str, temperature=None, weight=None) -> dict | None:
    return next(
        (e for e in entries if (e["model"], e["temperature"], e["weight"]) == (model, temperature, weight)), None
    )


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


def _curves(models: list[tuple[list[dict], str, str, object]], series: str) -> list[dict]:
    """One `draw_curves` curve per (records of one model, one per seed; label, colour, line style):
    the mean loss vs step of record[series] over the seeds, with its 95% t band."""
    return [
        {"label": label, "color": color, "ls": dash, **seed_curve(runs, series)} for runs, label, color, dash in models
    ]


def _level(ax: plt.Axes, entry: dict | None, color: str, ls, label: str) -> None:
    """A model's mean validation loss as a horizontal line, its 95% t interval as a band."""
    if entry is None or entry.get("validation_loss") is None:
        return
    loss = entry["validation_loss"]
    ax.axhline(loss["mean"], color=color, ls=ls, lw=1.2, label=f"{label}: {loss['mean']:.3f}")
    if loss["low"] is not None:
        ax.axhspan(loss["low"], loss["high"], color=color, alpha=bands.BAND_ALPHA / 2, lw=0)


def temperature_sweep(payload: dict, out_dir: Path) -> list[Path]:
    """Left: the distilled students' validation loss vs T (log2 axis), one line per weight, with
    the student trained alone and the teacher as horizontal lines, each the mean over seeds with
    its 95% t interval. Right: the gain over the student trained alone (baseline - student, nats
    per byte, paired by seed; > 0: the teacher helped), with its 95% t interval."""
    config, name = payload["config"], payload["experiment"]
    summary = _summary(payload)
    groups, paired = summary["groups"], summary["paired"]
    fig, (loss_ax, gain_ax) = plt.subplots(1, 2, figsize=(11.0, 4.2), layout="constrained")
    for i, weight in enumerate(config["weights"]):
        x = np.array([t for t in sorted(config["temperatures"]) if _entry(groups, "student", t, weight)])
        if not x.size:
            continue
        mean, low, high = bands.from_summary([_entry(groups, "student", t, weight)["validation_loss"] for t in x])
        best = int(np.argmin(mean))
        label = f"distilled student, w = {weight:g} (best T = {x[best]:g}: {mean[best]:.3f})"
        look = {"marker": style.MARKERS[i % len(style.MARKERS)], "color": WEIGHT_COLORS[i % len(WEIGHT_COLORS)]}
        loss_ax.errorbar(x, mean, yerr=bands.errors(mean, low, high), lw=1.6, capsize=3, label=label, **look)
        differences = [_entry(paired, "student", t, weight) for t in x]
        if all(d is not None for d in differences):
            diff, diff_low, diff_high = bands.from_summary([d["validation_loss"] for d in differences])
            gain = -diff  # baseline - student = -(student - baseline); the interval flips with it
            yerr = bands.errors(gain, -diff_high, -diff_low)
            gain_ax.errorbar(x, gain, yerr=yerr, lw=1.6, capsize=3, label=label, **look)
    baseline = _entry(groups, "baseline", None, 0.0)
    _level(loss_ax, baseline, BASELINE_COLOR, "--", "student alone (no teacher)")
    if baseline is not None:
        gain_ax.axhline(0.0, color=BASELINE_COLOR, ls="--", lw=1.2, label="student alone (no teacher)")
    _level(loss_ax, _entry(groups, "teacher"), TEACHER_COLOR, ":", "teacher")
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
    seeds = max((len(g["seeds"]) for g in groups), default=1)
    fig.suptitle(
        f"Distillation from a {_shape(config['teacher'])} teacher into a {_shape(config['student'])} student "
        f"({training['steps']} steps, batch {training['batch_size']} × {training['seq_len']} bytes; "
        f"loss on {config['eval_windows']} validation windows)\n{bands.note(seeds)}"
        + ("; the gain paired by seed" if seeds > 1 else ""),
        fontsize=10,
    )
    return style.save(fig, out_dir / f"{name}_temperature")


def training_curves(payload: dict, out_dir: Path) -> list[Path]:
    """Left: validation cross-entropy vs step for every model (comparable across models). Right:
    each model's training objective vs step (cross-entropy for the teacher and the student
    alone; (1 - w) CE + w T^2 KL for a distilled student, so its scale depends on T and w). Each
    curve is the mean over seeds with its 95% t band."""
    config, name = payload["config"], payload["experiment"]
    teacher, baseline, students = _by_model(payload)
    models = []
    if teacher:
        models.append((teacher, f"teacher ({_shape(config['teacher'])})", TEACHER_COLOR, "-"))
    if baseline:
        models.append((baseline, "student alone (no teacher)", BASELINE_COLOR, BASELINE_DASH))
    dash = {w: WEIGHT_DASHES[i % len(WEIGHT_DASHES)] for i, w in enumerate(config["weights"])}
    firsts = [runs[0] for runs in students]
    for runs, color in zip(students, _student_colors(firsts), strict=True):
        models.append((runs, _student_label(runs[0], config["weights"]), color, dash[runs[0]["weight"]]))
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
    seeds = len(bands.seeds_in([r for runs in (teacher, baseline, *students) for r in runs]))
    fig.suptitle(
        f"Teacher: {_shape(config['teacher'])}, {config['teacher_training']['steps']} steps; "
        f"students: {_shape(config['student'])}, {config['student_training']['steps']} steps; {bands.note(seeds)}",
        fontsize=10,
    )
    return style.save(fig, out_dir / f"{name}_training")


def render(payload: dict, out_dir: Path) -> list[Path]:
    style.setup()
    return temperature_sweep(payload, out_dir) + training_curves(payload, out_dir)


def _gain(difference: dict) -> dict:
    """The gain over the student alone (alone - distilled) from a (distilled - alone) difference's interval."""
    low, high = difference["low"], difference["high"]
    flipped = {"low": None if high is None else -high, "high": None if low is None else -low}
    return {**difference, "mean": -difference["mean"], **flipped}


def findings(payload: dict) -> list:
    """Against the student trained alone, paired by seed: the teacher's validation loss (how much
    there was to gain), each weight's gain from distillation at every temperature, and the best
    and worst (T, w) setting."""
    config, name = payload["config"], payload["experiment"]
    summary = _summary(payload)
    groups, pairs = summary["groups"], summary["paired"]
    seeds = seed_count(groups)
    figure = f"{name}_temperature.png"
    alone = _entry(groups, "baseline", None, 0.0)
    if alone is None or alone.get("validation_loss") is None:
        return []
    base = alone["validation_loss"]
    context = f"Validation loss (nats per byte), {seeds_text(seeds)}"
    out = [one_seed(config)] if seeds == 1 else []
    teacher, taught = _entry(groups, "teacher"), _entry(pairs, "teacher")
    if teacher is not None and taught is not None and taught.get("validation_loss") is not None:
        row = Row(f"the teacher ({_shape(config['teacher'])})", teacher["validation_loss"], taught["validation_loss"])
        student = f"the student alone ({_shape(config['student'])})"
        out.append(Finding(f"{context}: {comparison_text(row, student, base)}", significance(row.difference), figure))
    students = []
    for weight in config["weights"]:
        parts = []
        for temperature in sorted(config["temperatures"]):
            group, difference = (
                _entry(groups, "student", temperature, weight),
                _entry(pairs, "student", temperature, weight),
            )
            if group is None or difference is None or difference.get("validation_loss") is None:
                continue
            gain = _gain(difference["validation_loss"])
            students.append((temperature, weight, group["validation_loss"], difference["validation_loss"], gain))
            parts.append((temperature, gain))
        if not parts:
            continue
        listed = ", ".join(f"T = {t:g}: {value_text(gain, signed=True)}" for t, gain in parts)
        claim = (
            f"Gain over the student alone (its validation loss minus the distilled student's, nats per byte; "
            f"> 0: the teacher helped), w = {weight:g}, {seeds_text(seeds)}: {listed}"
        )
        if seeds > 1:
            helped = ", ".join(f"{t:g}" for t, gain in parts if significance(gain) and gain["mean"] > 0)
            hurt = ", ".join(f"{t:g}" for t, gain in parts if significance(gain) and gain["mean"] < 0)
            claim += f"; interval above 0 (the teacher helped) at T = {helped}" if helped else "; no interval above 0"
            claim += f", below 0 (it hurt) at T = {hurt}" if hurt else ", none below 0"
        out.append(Finding(claim, None, figure))
    if students:
        ordered = sorted(students, key=lambda s: s[2]["mean"])
        picks = [("best", ordered[0])] + ([("worst", ordered[-1])] if len(ordered) > 1 else [])
        for word, (temperature, weight, loss, difference, _) in picks:
            row = Row(f"T = {temperature:g}, w = {weight:g},", loss, difference)
            claim = f"{context}, the {word} distilled student is {comparison_text(row, 'the student alone', base)}"
            out.append(Finding(claim, significance(difference), figure))
    return out
