"""Figures of an extrapolation results file: held-out query accuracy against the evaluation length
per normalizer, one panel per positional encoding (mean over seeds with its 95% t band), under it
each normalizer's paired difference to softmax with the same encoding; and the training curves.

The intervals come from the results file's "summary" (written when the sweep finished); for a run
still in progress they are computed from its records the same way. A file of one seed is drawn as
that one run, without bands.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from attnlab.experiments import extrapolation, lm
from attnlab.figures import bands, style

ENCODINGS = {"rope": "RoPE", "none": "NoPE", "alibi": "ALiBi"}


def _summary(payload: dict) -> dict:
    """The results file's summary, or the same computed from its records (a run in progress)."""
    summary = payload.get("summary")
    if summary is not None:
        return summary
    return extrapolation.summary_of(payload["records"], lm.baseline_label(payload["config"]["normalizers"]))


def _encoding(positional: str) -> str:
    return ENCODINGS.get(positional, positional)


def _length(n: int, training_length: int) -> str:
    """'8,192 (256 L)'; the training length itself is 'L = 32'."""
    if n == training_length:
        return f"L = {n:,}"
    factor = n / training_length
    return f"{n:,} ({factor:.0f} L)" if factor == round(factor) else f"{n:,} ({factor:.1f} L)"


def _series(entries: list[dict], label: str, positional: str, lengths: list[int], metric: str):
    """(lengths, mean, low, high) of one normalizer's `metric` intervals under one encoding."""
    by_length = {
        e["length"]: e.get(metric) for e in entries if e["normalizer"] == label and e["positional"] == positional
    }
    xs = [n for n in lengths if by_length.get(n) is not None]
    mean, low, high = bands.from_summary([by_length[n] for n in xs])
    return np.array(xs, dtype=float), mean, low, high


def _seeds(records: list[dict]) -> int:
    return len(bands.seeds_in([r for r in records if r.get("record") == "evaluation"]))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _task(config: dict) -> str:
    model, training = config["model"], config["training"]
    return (
        f"MQAR, {_count(config['num_kv_pairs'], 'key-value pair')}, vocabulary {config['vocab_size']}; "
        f"{_count(model['layers'], 'layer')}, width {model['width']}, {_count(model['heads'], 'head')}; "
        f"trained {training['steps']} steps at L = {training['seq_len']}"
    )


def _guesses(config: dict) -> list[tuple[float, str]]:
    """(accuracy, what): guessing one of the value tokens (vocab_size - vocab_size // 2 of them)
    and, with several pairs, guessing among the sequence's values."""
    values = config["vocab_size"] - config["vocab_size"] // 2
    out = [(1.0 / values, "guessing a value token")]
    if config["num_kv_pairs"] > 1:
        out.append((1.0 / config["num_kv_pairs"], "guessing among the pairs"))
    return out


def accuracy_vs_length(payload: dict, out_dir: Path) -> list[Path]:
    """Top row, one panel per encoding: held-out query accuracy vs evaluation length (log), one line
    per normalizer with its 95% t band over seeds; dotted: L, and guessing (`_guesses`). Bottom
    row (when softmax ran): each other normalizer's accuracy minus softmax's with the same encoding,
    paired by seed, with its band; where a band misses 0 the two differ at the 95% level."""
    config, name = payload["config"], payload["experiment"]
    specs, positionals, lengths = config["normalizers"], config["positionals"], config["eval_lengths"]
    training_length = config["training"]["seq_len"]
    summary = _summary(payload)["evaluation"]
    colors = style.colors_for(specs)
    paired = summary.get("paired", [])
    rows = 2 if paired else 1
    fig, axes = plt.subplots(
        rows, len(positionals), figsize=(4.6 * len(positionals), 3.8 * rows), squeeze=False, sharex=True,
        sharey="row", layout="constrained",
    )  # fmt: skip
    against = paired[0]["against"]["normalizer"] if paired else None
    for col, positional in enumerate(positionals):
        ax = axes[0][col]
        for i, spec in enumerate(specs):
            x, mean, low, high = _series(summary["groups"], spec["label"], positional, lengths, "accuracy")
            if x.size:
                bands.draw(ax, x, mean, low, high, color=colors[spec["label"]], lw=1.6, ms=4,
                           marker=style.MARKERS[i % len(style.MARKERS)], label=style.display_label(spec))  # fmt: skip
        for level, label in _guesses(config):
            ax.axhline(level, color="0.4", ls=":", lw=1.0, label=label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(_encoding(positional))
        if col == 0:
            ax.set_ylabel("held-out query accuracy")
        if paired:
            ax = axes[1][col]
            for i, spec in enumerate(specs):
                if spec["label"] == against:
                    continue
                x, mean, low, high = _series(paired, spec["label"], positional, lengths, "accuracy")
                if x.size:
                    bands.draw(ax, x, mean, low, high, color=colors[spec["label"]], lw=1.6, ms=4,
                               marker=style.MARKERS[i % len(style.MARKERS)])  # fmt: skip
            ax.axhline(0.0, color="black", lw=0.8)
            if col == 0:
                ax.set_ylabel(f"accuracy − {against}'s\n(same encoding, paired by seed)")
    for ax in axes.ravel():
        ax.axvline(training_length, color="0.3", ls=":", lw=1.0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_length(n, training_length).replace(" (", "\n(") for n in lengths])
        ax.minorticks_off()
    for ax in axes[-1]:
        ax.set_xlabel("evaluation length n (tokens)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", frameon=False, fontsize=8)
    fig.suptitle(
        f"Length extrapolation: {_task(config)}\n{bands.note(_seeds(payload['records']))}; dotted vertical: L",
        fontsize=10,
    )
    return style.save(fig, out_dir / f"{name}_accuracy")


def training_curves(payload: dict, out_dir: Path) -> list[Path]:
    """One panel per encoding: the training loss at the queries vs step, one colour per normalizer,
    the mean over seeds with its band (a model that never leaves its plateau shows it here); dotted:
    the loss of guessing (`_guesses`)."""
    config, name = payload["config"], payload["experiment"]
    specs, positionals = config["normalizers"], config["positionals"]
    colors = style.colors_for(specs)
    records = [r for r in payload["records"] if r.get("record") == "training"]
    fig, axes = plt.subplots(
        1, len(positionals), figsize=(4.2 * len(positionals), 3.4), sharey=True, squeeze=False, layout="constrained"
    )
    for ax, positional in zip(axes[0], positionals, strict=True):
        for spec in specs:
            runs = [r for r in records if r["normalizer"] == spec["label"] and r["positional"] == positional]
            if not runs:
                continue
            steps = [entry["step"] for entry in runs[0]["history"]]
            curves = [[entry["loss"] for entry in r["history"]] for r in runs if len(r["history"]) == len(steps)]
            mean, low, high = bands.curve_band(curves)
            bands.draw(ax, steps, mean, low, high, color=colors[spec["label"]], lw=1.3,
                       label=style.display_label(spec))  # fmt: skip
        for level, _ in _guesses(config):
            ax.axhline(-np.log(level), color="0.4", ls=":", lw=1.0)
        ax.set_title(_encoding(positional))
        ax.set_xlabel("optimizer step")
    axes[0][0].set_ylabel("training loss at the queries (nats)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", frameon=False, fontsize=8)
    fig.suptitle(
        f"Training at L = {config['training']['seq_len']}: {bands.note(len(bands.seeds_in(records)))}; "
        f"dotted: the loss of {' and of '.join(label for _, label in _guesses(config))}",
        fontsize=10,
    )
    return style.save(fig, out_dir / f"{name}_training")


def render(payload: dict, out_dir: Path) -> list[Path]:
    style.setup()
    return accuracy_vs_length(payload, out_dir) + training_curves(payload, out_dir)


def _signed(interval: dict) -> str:
    """A difference's "+m [+low, +high]", or "+m (one seed)"."""
    if interval.get("low") is None:
        return f"{interval['mean']:+.3f} (one seed)"
    return f"{interval['mean']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"


def findings(payload: dict) -> list:
    """Per encoding: the baseline's accuracy at the shortest and the longest length (does it learn
    the task, does it keep it); then at the longest length each other normalizer's accuracy, its
    paired difference to the baseline with the same encoding, and whether that interval excludes 0."""
    from attnlab.figures.findings import Finding, interval_text

    config = payload["config"]
    summary = _summary(payload)["evaluation"]
    groups, paired = summary["groups"], summary.get("paired", [])
    training_length = config["training"]["seq_len"]
    figure = f"{payload['experiment']}_accuracy.png"
    labels = {spec["label"]: style.display_label(spec) for spec in config["normalizers"]}
    baseline = paired[0]["against"]["normalizer"] if paired else None
    out = []
    for positional in config["positionals"]:
        here = {(g["normalizer"], g["length"]): g for g in groups if g["positional"] == positional}
        lengths = sorted({length for _, length in here})
        if not lengths:
            continue
        first, last = lengths[0], lengths[-1]
        encoding = _encoding(positional)
        base = {n: here.get((baseline, n)) for n in (first, last)}
        if baseline is not None and all(base.values()):
            seeds = _count(len(base[last]["seeds"]), "seed")
            out.append(
                Finding(
                    f"{encoding}, {labels.get(baseline, baseline)} ({seeds}): held-out query accuracy "
                    f"{interval_text(base[first]['accuracy'])} at n = {_length(first, training_length)} and "
                    f"{interval_text(base[last]['accuracy'])} at n = {_length(last, training_length)}",
                    None,
                    figure,
                )
            )
        for entry in paired:
            if entry["positional"] != positional or entry["length"] != last or entry.get("accuracy") is None:
                continue
            difference = entry["accuracy"]
            mine = here[(entry["normalizer"], last)]["accuracy"]
            theirs = here[(baseline, last)]["accuracy"]
            label = labels.get(entry["normalizer"], entry["normalizer"])
            claim = (
                f"{encoding}, n = {_length(last, training_length)}: {label} "
                f"answers {interval_text(mine)} of the queries against {labels.get(baseline, baseline)}'s "
                f"{interval_text(theirs)}, a paired difference of {_signed(difference)}"
                + (f" over {difference['n']} seeds" if difference["n"] > 1 else "")
            )
            out.append(Finding(claim, difference["significant"] if difference["low"] is not None else None, figure))
    return out
