"""Figures of a calibration results file: reliability diagrams before and after temperature scaling,
the calibration scores per output normalizer, and the training curves.

The scores are each output's mean over the seeds with its 95% t interval as an error bar, from
the results file's "summary" (written when the sweep finished) or, for a run still in progress,
computed from its records the same way; the reliability diagrams pool the seeds' predictions
(equal-width bins are the same for every seed), the training curves are the mean over seeds with
their 95% t band. A file of one seed (or written before seeds were swept: its records are seed
0) is drawn as that one run, without intervals.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from attnlab.experiments import calibration, lm
from attnlab.figures import bands, style
from attnlab.figures.findings import (
    Finding,
    against_baseline,
    comparison_text,
    extremes,
    interval_text,
    one_seed,
    paired,
    seed_count,
    seeds_text,
    significance,
)
from attnlab.figures.training import draw_curves, seed_curve

BEFORE, AFTER = "#e15759", "#4e79a7"
SCORES = (
    ("ece_width", "ECE, equal-width bins"),
    ("ece_mass", "ECE, equal-mass bins"),
    ("brier", "Brier score"),
    ("zero_target_fraction", "targets given probability 0"),
)


def _records(payload: dict, kind: str) -> dict[str, list[dict]]:
    """output label -> its records of `kind` (one per seed), in the order the run wrote them."""
    out: dict[str, list[dict]] = {}
    for r in payload["records"]:
        if r.get("record") == kind:
            out.setdefault(r["output"], []).append(r)
    return out


def _outputs(payload: dict) -> list[str]:
    """Output labels in run order, those with results only."""
    found = _records(payload, "calibration")
    return [label for label in _records(payload, "training") if label in found]


def _summary(payload: dict) -> dict:
    """The results file's summary, or the same computed from its records (a run in progress)."""
    summary = payload.get("summary")
    if summary is not None:
        return summary
    return calibration.summary_of(payload["records"], calibration.baseline_label(payload["config"]["outputs"]))


def _pooled(reports: list[dict]) -> dict:
    """Equal-width reliability bins pooled over seeds: counts added, confidence and accuracy
    averaged with the counts as weights (the seeds' bins share their edges)."""
    edges = reports[0]["reliability"]["width"]["edges"]
    count = np.zeros(len(edges) - 1)
    confidence, accuracy = np.zeros_like(count), np.zeros_like(count)
    for report in reports:
        bins = report["reliability"]["width"]
        if bins["edges"] != edges:
            raise ValueError("the seeds' equal-width reliability bins differ; they cannot be pooled")
        n = np.array(bins["count"], dtype=float)
        count += n
        confidence += n * np.array([0.0 if v is None else v for v in bins["confidence"]])
        accuracy += n * np.array([0.0 if v is None else v for v in bins["accuracy"]])
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"edges": edges, "count": count, "confidence": confidence / count, "accuracy": accuracy / count}


def _curve(bins: dict) -> tuple[np.ndarray, np.ndarray]:
    keep = [i for i, c in enumerate(bins["count"]) if c > 0]
    return np.array([bins["confidence"][i] for i in keep]), np.array([bins["accuracy"][i] for i in keep])


def _score(summary: dict, label: str, stage: str, key: str) -> dict | None:
    """The summary interval of one output's score at one stage (None when it has none)."""
    entry = next((e for e in summary["scores"]["groups"] if e["output"] == label and e["stage"] == stage), None)
    return None if entry is None else entry.get(key)


def _temperature(summary: dict, label: str) -> float:
    return next(e["temperature"]["mean"] for e in summary["temperature"]["groups"] if e["output"] == label)


def reliability(payload: dict, out_dir: Path) -> list[Path]:
    """Per output: accuracy vs confidence (equal-width bins, every seed's test predictions pooled)
    before and after scaling, and the number of test predictions per bin underneath; the legend
    gives the mean over seeds of the fitted T and of the ECE."""
    found = _records(payload, "calibration")
    summarised = _summary(payload)
    labels = _outputs(payload)
    fig, axes = plt.subplots(
        2, len(labels), figsize=(3.0 * len(labels), 5.4), squeeze=False, height_ratios=[3, 1.2], layout="constrained"
    )
    for column, label in enumerate(labels):
        records = found[label]
        top, bottom = axes[0, column], axes[1, column]
        top.plot([0, 1], [0, 1], color="#7f7f7f", lw=1, ls=":", label="perfect calibration")
        stages = (("before", BEFORE, "as trained"), ("after", AFTER, f"T = {_temperature(summarised, label):.2f}"))
        for stage, color, name in stages:
            bins = _pooled([r[stage] for r in records])
            confidence, accuracy = _curve(bins)
            name = f"{name}: ECE {_score(summarised, label, stage, 'ece_width')['mean']:.3f}"
            top.plot(confidence, accuracy, marker="o", ms=4, color=color, lw=1.4, label=name)
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
    test = next(iter(found.values()))[0]["test_examples"] if found else 0
    seeds = len(bands.seeds_in([r for records in found.values() for r in records]))
    pooled = f"; {seeds} seeds pooled, T and ECE their means" if seeds > 1 else ""
    fig.suptitle(f"Reliability of next-byte predictions ({test:,} validation positions per model{pooled})", fontsize=11)
    return style.save(fig, out_dir / f"{payload['experiment']}_reliability")


def summary(payload: dict, out_dir: Path) -> list[Path]:
    """Grouped bars per output: ECE (both binnings), Brier score and zero-probability targets,
    before and after, each the mean over seeds with its 95% t interval as an error bar."""
    summarised = _summary(payload)
    labels = _outputs(payload)
    x = np.arange(len(labels))
    fig, axes = plt.subplots(1, len(SCORES), figsize=(3.3 * len(SCORES), 3.8), layout="constrained")
    for ax, (key, title) in zip(axes, SCORES, strict=True):
        for stage, color, shift in (("before", BEFORE, -0.2), ("after", AFTER, 0.2)):
            mean, low, high = bands.from_summary([_score(summarised, label, stage, key) for label in labels])
            name = "as trained" if stage == "before" else "temperature-scaled"
            ax.bar(x + shift, mean, width=0.4, color=color, label=name)
            if np.any(high > low):
                ax.errorbar(x + shift, mean, yerr=bands.errors(mean, low, high), ls="none", color="black",
                            capsize=2.5, lw=1.0)  # fmt: skip
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_title(title)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=2, frameon=False)
    temperatures = ", ".join(f"{label} {_temperature(summarised, label):.2f}" for label in labels)
    seeds = max((len(g["seeds"]) for g in summarised["scores"]["groups"]), default=1)
    fig.suptitle(
        f"Calibration on validation bytes ({bands.note(seeds)}); fitted T{' (mean)' if seeds > 1 else ''}: "
        f"{temperatures}",
        fontsize=10,
    )
    return style.save(fig, out_dir / f"{payload['experiment']}_scores")


def training_curves(payload: dict, out_dir: Path) -> list[Path]:
    """Each model's training loss (its own output's loss, so scales differ between outputs) vs
    step, the mean over seeds with its 95% t band."""
    trained = _records(payload, "training")
    colors = style.colors_for([{"name": label.split(" ")[0], "label": label} for label in trained])
    curves = [{"label": label, "color": colors[label], **seed_curve(runs)} for label, runs in trained.items()]
    seeds = len(bands.seeds_in([r for runs in trained.values() for r in runs]))
    fig, axes = plt.subplots(1, len(curves), figsize=(2.8 * len(curves), 3.2), squeeze=False, layout="constrained")
    for ax, curve in zip(axes[0], curves, strict=True):
        draw_curves(ax, [curve])
        ax.set_title(curve["label"])
    axes[0, 0].set_ylabel("training loss (the output's own)")
    model, training = payload["config"]["model"], payload["config"]["training"]
    fig.suptitle(
        f"{model['layers']} layers, width {model['width']}, softmax attention; L = {training['seq_len']}, "
        f"batch {training['batch_size']}; {bands.note(seeds)}",
        fontsize=10,
    )
    return style.save(fig, out_dir / f"{payload['experiment']}_training_loss")


def render(payload: dict, out_dir: Path) -> list[Path]:
    style.setup()
    return reliability(payload, out_dir) + summary(payload, out_dir) + training_curves(payload, out_dir)


def findings(payload: dict) -> list:
    """Against plain softmax, paired by seed: the outputs with the lowest and highest ECE as trained
    and after temperature scaling, what scaling does to each output's ECE, the lowest and highest
    accuracy, the NLL of the outputs where it is finite, and the share of targets the sparse ones
    give probability 0 (their NLL is infinite)."""
    config, name = payload["config"], payload["experiment"]
    summarised = _summary(payload)
    scores = summarised["scores"]
    seeds = seed_count(scores["groups"])
    out = [one_seed(config)] if seeds == 1 else []
    bins = config.get("bins")
    ece = f"ECE ({bins} equal-width bins)" if bins else "ECE (equal-width bins)"
    figure, reliability = f"{name}_scores.png", f"{name}_reliability.png"
    stages = {"before": "as trained", "after": "after temperature scaling"}
    for stage, words in stages.items():
        found = against_baseline(scores, "ece_width", "output", {"stage": stage})
        out += extremes(f"{ece} {words}, {seeds_text(seeds)}", "ECE", found, figure)
    out += _scaling(payload, summarised, ece, seeds, reliability)
    found = against_baseline(scores, "accuracy", "output", {"stage": "before"})
    out += extremes(f"Next-byte accuracy, {seeds_text(seeds)}", "accuracy", found, None)
    baseline, base_nll, rows = against_baseline(scores, "nll", "output", {"stage": "before"})
    for row in rows:
        claim = f"NLL (nats per byte) as trained, {seeds_text(seeds)}: {comparison_text(row, baseline, base_nll)}"
        out.append(Finding(claim, significance(row.difference), None))
    out += _zeros(summarised, baseline, base_nll, seeds, figure)
    return out


def _scaling(payload: dict, summarised: dict, ece: str, seeds: int, figure: str) -> list:
    """One finding: each output's ECE before -> after temperature scaling, with its fitted T (and,
    over several seeds, the paired interval of the change)."""
    before_by_seed: dict[str, dict[int, float]] = {}
    after_by_seed: dict[str, dict[int, float]] = {}
    for r in payload["records"]:
        if r.get("record") == "calibration" and r["before"].get("ece_width") is not None:
            before_by_seed.setdefault(r["output"], {})[lm.seed_of(r)] = r["before"]["ece_width"]
            after_by_seed.setdefault(r["output"], {})[lm.seed_of(r)] = r["after"]["ece_width"]
    parts = []
    for label in _outputs(payload):
        before, after = (
            _score(summarised, label, "before", "ece_width"),
            _score(summarised, label, "after", "ece_width"),
        )
        if before is None or after is None or label not in before_by_seed:
            continue
        part = f"{label} {before['mean']:.3f} → {after['mean']:.3f} (T = {_temperature(summarised, label):.2f}"
        if seeds > 1:
            part += f"; {interval_text(paired(after_by_seed[label], before_by_seed[label]), signed=True)}"
        parts.append(part + ")")
    if not parts:
        return []
    temperatures = [e["temperature"]["mean"] for e in summarised["temperature"]["groups"]]
    fitted = "T fitted per output on held-out windows" + ("; T the mean over seeds" if seeds > 1 else "")
    if temperatures and max(temperatures) < 1.0:
        fitted += "; every T below 1, so scaling sharpens every output"
    elif temperatures and min(temperatures) > 1.0:
        fitted += "; every T above 1, so scaling flattens every output"
    change = ", the change paired by seed" if seeds > 1 else ""
    return [
        Finding(
            f"Temperature scaling ({fitted}), {seeds_text(seeds)}, {ece} before → after{change}: " + ", ".join(parts),
            None,
            figure,
        )
    ]


def _zeros(summarised: dict, baseline: str | None, base_nll: dict | None, seeds: int, figure: str) -> list:
    """One finding naming the outputs that give probability 0 to some test targets (NLL infinite)."""
    zero = [
        g for g in summarised["scores"]["groups"]
        if g["stage"] == "before" and g.get("zero_target_fraction") and g["zero_target_fraction"]["mean"] > 0
    ]  # fmt: skip
    if not zero:
        return []
    parts = ", ".join(f"{g['output']} {100 * g['zero_target_fraction']['mean']:.2f}%" for g in zero)
    claim = (
        f"Targets given probability 0 as trained, {seeds_text(seeds)}: {parts} of the test bytes; on any seed "
        "where that share is above 0 the NLL is infinite"
    )
    nonzero = ", ".join(f"{g['output']} {g['nll_nonzero']['mean']:.3f}" for g in zero if g.get("nll_nonzero"))
    if nonzero and base_nll is not None:
        claim += (
            f"; the NLL over the other targets ({nonzero}) leaves out the targets given probability 0, so it is "
            f"not comparable with {baseline}'s {base_nll['mean']:.3f}"
        )
    return [Finding(claim, None, figure)]
