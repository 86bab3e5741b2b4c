"""Figures of an MQAR results file: recall accuracy versus model width per normalizer (mean over
seeds with 95% t-interval error bars) beside each normalizer's paired difference to softmax, and
the training curves per width.

The intervals are computed from the records by `attnlab.experiments.mqar.summary_of`, as the run's
summary is (so a file written before a statistic existed, or a run still in progress, is drawn the
same way).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from attnlab.experiments import intervals, lm, mqar
from attnlab.figures import style
from attnlab.figures.findings import Finding, against_baseline, extremes, one_seed, seed_count, seeds_text

# Neighbouring normalizers' error bars at one width are spread over +-SPREAD of a log2 step.
SPREAD = 0.12


def _summary(payload: dict) -> dict:
    return mqar.summary_of(payload["records"], lm.baseline_label(payload["config"]["normalizers"]))


def _series(entries: list[dict], label: str, widths: list[int], metric: str) -> tuple[np.ndarray, ...]:
    """(widths, means, lower errors, upper errors) of one normalizer's `metric` intervals; widths
    with one seed get no error bar."""
    by_width = {e["width"]: e[metric] for e in entries if e["normalizer"] == label and e.get(metric) is not None}
    xs = [w for w in widths if w in by_width]
    means = np.array([by_width[w]["mean"] for w in xs], dtype=float)
    low = np.array([by_width[w]["low"] if by_width[w]["low"] is not None else by_width[w]["mean"] for w in xs])
    high = np.array([by_width[w]["high"] if by_width[w]["high"] is not None else by_width[w]["mean"] for w in xs])
    return np.array(xs, dtype=float), means, means - low, high - means


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _per_width_rows(config: dict, names: dict[str, str], cells: dict, show) -> list[str]:
    """One "name a / b / c" entry per normalizer that has any cell, its widths in the config's order:
    ``show(cells[label, width])`` at each width, "n/a" where a width has no cell."""
    rows = []
    for spec in config["normalizers"]:
        label = spec["label"]
        if any((label, w) in cells for w in config["widths"]):
            shown = (show(cells[label, w]) if (label, w) in cells else "n/a" for w in config["widths"])
            rows.append(f"{names[label]} " + " / ".join(shown))
    return rows


def _task(config: dict) -> str:
    return (
        f"L = {config['training']['seq_len']}, {config['num_kv_pairs']} key-value pairs, "
        f"vocabulary {config['vocab_size']}, {_count(config['layers'], 'layer')} × {_count(config['heads'], 'head')}, "
        f"{config['training']['steps']} steps"
    )


def accuracy_vs_width(payload: dict, out_dir: Path) -> list[Path]:
    """Left: held-out query accuracy vs width (log2), one line per normalizer, mean over seeds
    with its 95% t interval. Right (when a softmax normalizer ran): each other normalizer's
    paired accuracy difference to softmax at the same width (same seeds, same data), with its
    interval; bars that miss 0 mark a difference at the 95% level."""
    config, name = payload["config"], payload["experiment"]
    specs, widths = config["normalizers"], config["widths"]
    summary = _summary(payload)
    colors = style.colors_for(specs)
    paired = summary.get("paired", [])
    panels = 2 if paired else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.4 * panels, 4.2), squeeze=False, layout="constrained")
    offsets = np.linspace(-SPREAD, SPREAD, len(specs)) if len(specs) > 1 else np.zeros(1)
    ax = axes[0][0]
    for i, spec in enumerate(specs):
        xs, means, below, above = _series(summary["groups"], spec["label"], widths, "accuracy")
        if xs.size:
            ax.errorbar(
                xs * 2.0 ** offsets[i], means, yerr=[below, above], color=colors[spec["label"]],
                marker=style.MARKERS[i % len(style.MARKERS)], ms=5, lw=1.5, capsize=3,
                label=style.display_label(spec),
            )  # fmt: skip
    ax.axhline(1.0 / config["num_kv_pairs"], color="0.4", ls=":", lw=1.0, label="guessing among the pairs")
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("model width d")
    ax.set_ylabel("held-out query accuracy")
    ax.set_title("accuracy vs width", fontsize=10)
    ax.legend(frameon=False, loc="best")
    if paired:
        ax = axes[0][1]
        against = paired[0]["against"]["normalizer"]
        others = [spec for spec in specs if spec["label"] != against]
        for i, spec in enumerate(others):
            xs, means, below, above = _series(paired, spec["label"], widths, "accuracy")
            if xs.size:
                ax.errorbar(
                    xs * 2.0 ** offsets[i % len(offsets)], means, yerr=[below, above],
                    color=colors[spec["label"]], marker=style.MARKERS[(specs.index(spec)) % len(style.MARKERS)],
                    ms=5, lw=1.5, capsize=3, label=style.display_label(spec),
                )  # fmt: skip
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
        ax.set_xlabel("model width d")
        ax.set_ylabel(f"accuracy − {against}'s (paired by seed)")
        ax.set_title(f"paired difference to {against}", fontsize=10)
        ax.legend(frameon=False, loc="best")
    fig.suptitle(
        f"MQAR: {_task(config)}; mean over {_count(len(config['seeds']), 'seed')}, "
        f"error bars: {round(100 * summary['level'])}% Student t interval",
        fontsize=10,
    )
    return style.save(fig, out_dir / f"{name}_accuracy")


def training_curves(payload: dict, out_dir: Path) -> list[Path]:
    """One panel per width: the training loss at the queries vs step, one colour per normalizer,
    one line per seed (a normalizer that never leaves its plateau shows it here)."""
    config, name = payload["config"], payload["experiment"]
    specs, widths = config["normalizers"], config["widths"]
    colors = style.colors_for(specs)
    records = [r for r in payload["records"] if r.get("record") == "training"]
    fig, axes = plt.subplots(
        1, len(widths), figsize=(3.6 * len(widths) + 0.6, 3.6), sharey=True, squeeze=False, layout="constrained"
    )
    for ax, width in zip(axes[0], widths, strict=True):
        for spec in specs:
            runs = [r for r in records if r["normalizer"] == spec["label"] and r["width"] == width]
            for j, r in enumerate(sorted(runs, key=lambda r: r["seed"])):
                steps = [entry["step"] for entry in r["history"]]
                losses = [entry["loss"] for entry in r["history"]]
                label = style.display_label(spec) if j == 0 else None
                ax.plot(steps, losses, color=colors[spec["label"]], lw=1.1, alpha=0.8, label=label)
        ax.axhline(np.log(config["num_kv_pairs"]), color="0.4", ls=":", lw=1.0)
        ax.set_title(f"width {width}", fontsize=10)
        ax.set_xlabel("optimizer step")
    axes[0][0].set_ylabel("training loss at the queries (nats)")
    axes[0][0].legend(frameon=False, fontsize=7.5)
    fig.suptitle(
        f"MQAR training, one line per seed; {_task(config)}\ndotted: log of the pair count (guessing among the pairs)",
        fontsize=10,
    )
    return style.save(fig, out_dir / f"{name}_training")


def render(payload: dict, out_dir: Path) -> list[Path]:
    style.setup()
    return accuracy_vs_width(payload, out_dir) + training_curves(payload, out_dir)


def findings(payload: dict) -> list:
    """Held-out accuracy per normalizer at every width (one sentence), and at each width the
    normalizers with the highest and the lowest accuracy against softmax's, paired by seed."""
    config, name = payload["config"], payload["experiment"]
    summary = _summary(payload)
    seeds = seed_count(summary["groups"])
    figure = f"{name}_accuracy.png"
    names = {spec["label"]: style.display_label(spec) for spec in config["normalizers"]}
    widths = config["widths"]
    out = [one_seed(config)] if seeds == 1 else []
    accuracy = {(e["normalizer"], e["width"]): e["accuracy"] for e in summary["groups"] if e.get("accuracy")}
    table = _per_width_rows(config, names, accuracy, lambda a: f"{a['mean']:.3f}")
    if table:
        over = "" if seeds == 1 else ", means over seeds"
        out.append(
            Finding(
                f"Held-out query accuracy at width {' / '.join(map(str, widths))}, {seeds_text(seeds)}{over} "
                f"(guessing among the {config['num_kv_pairs']} pairs: {1 / config['num_kv_pairs']:.3f}): "
                + "; ".join(table),
                None,
                figure,
            )
        )
    for width in widths:
        found = against_baseline(summary, "accuracy", "normalizer", {"width": width}, names)
        out += extremes(f"Width {width}, {seeds_text(seeds)}", "accuracy", found, figure)
    if seeds > 1:
        out += solved_findings(summary["solved"], config, names, figure)
    return out


def solved_findings(solved: list[dict], config: dict, names: dict[str, str], figure: str) -> list[Finding]:
    """How many seeds solved the task per normalizer and width, and whether any count differs from
    the baseline's at its width by Fisher's exact test (with what the seed count allows at best)."""
    widths = config["widths"]
    counts = {(e["normalizer"], e["width"]): e for e in solved}
    rows = _per_width_rows(config, names, counts, lambda e: f"{e['solved']}")
    compared = [e for e in solved if e["fisher_p_against_baseline"] is not None]
    seeds = max(e["seeds"] for e in solved)
    best = intervals.fisher_exact((seeds, seeds), (0, seeds))
    claim = (
        f"Seeds (of {seeds}) whose model solved the task (held-out accuracy >= {mqar.SOLVED}) at width "
        f"{' / '.join(map(str, widths))}: " + "; ".join(rows)
    )
    if not compared:
        return [Finding(claim, None, figure)]
    baseline = names[lm.baseline_label(config["normalizers"])]
    differ = [e for e in compared if e["fisher_p_against_baseline"] < 1.0 - intervals.LEVEL]
    if differ:
        verdict = f"these counts differ from {baseline}'s at their width (Fisher's exact test): " + "; ".join(
            f"{names[e['normalizer']]} at width {e['width']}, p = {e['fisher_p_against_baseline']:.3f}" for e in differ
        )
    else:
        smallest = min(compared, key=lambda e: e["fisher_p_against_baseline"])
        p = smallest["fisher_p_against_baseline"]
        where = f", {names[smallest['normalizer']]} at width {smallest['width']}" if p < 1.0 else ""
        verdict = (
            f"no count differs from {baseline}'s at its width (Fisher's exact test, smallest p = {p:.3f}{where}); "
            f"with {seeds} seeds even {seeds} of {seeds} against 0 of {seeds} gives p = {best:.3f}"
        )
    return [Finding(f"{claim}; {verdict}", bool(differ), figure)]
