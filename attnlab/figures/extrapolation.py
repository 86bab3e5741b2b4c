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


# A model answering fewer than this fraction of the held-out queries at the training length did not
# learn the task (guessing a value token gets 1 / (vocab_size - vocab_size // 2)): its accuracy
# beyond L says nothing about extrapolation, so it is not compared there.
LEARNED = 0.5


def _means(accuracy: dict, label: str, lengths: list[int]) -> str:
    """'1.000 / 0.750 / 0.250': the label's mean accuracy at each length (n/a where not measured)."""
    return " / ".join(f"{accuracy[(label, n)]['mean']:.3f}" if accuracy.get((label, n)) else "n/a" for n in lengths)


def findings(payload: dict) -> list:
    """Per encoding: every normalizer's mean accuracy at each length (one sentence); at the longest
    length the normalizers with the lowest and the highest accuracy against softmax's with the same
    encoding, paired by seed; and which normalizers are below softmax there, above it, or level with
    it (intervals over seeds). A normalizer under LEARNED at the training length is said not to
    have learned the task and is not compared beyond it."""
    from attnlab.figures.findings import (
        Finding,
        against_baseline,
        extremes,
        one_seed,
        seed_count,
        seeds_text,
        tally,
        value_text,
    )

    config, name = payload["config"], payload["experiment"]
    summary = _summary(payload)["evaluation"]
    groups = summary["groups"]
    seeds = seed_count(groups)
    figure = f"{name}_accuracy.png"
    names = {spec["label"]: style.display_label(spec) for spec in config["normalizers"]}
    baseline = lm.baseline_label(config["normalizers"])
    training_length = config["training"]["seq_len"]
    lengths = sorted({g["length"] for g in groups})
    out = [one_seed(config)] if seeds == 1 else []
    if not lengths:
        return out
    first, last = lengths[0], lengths[-1]
    over = seeds_text(seeds) + ("" if seeds == 1 else ", means over seeds")
    at = " / ".join(_length(n, training_length) for n in lengths)
    for positional in config["positionals"]:
        encoding = _encoding(positional)
        here = {(g["normalizer"], g["length"]): g["accuracy"] for g in groups if g["positional"] == positional}
        labels = [spec["label"] for spec in config["normalizers"] if any(here.get((spec["label"], n)) for n in lengths)]
        if not labels:
            continue
        table = "; ".join(f"{names[label]} {_means(here, label, lengths)}" for label in labels)
        out.append(Finding(f"{encoding}, held-out query accuracy at n = {at}, {over}: {table}", None, figure))
        if baseline is None or last == first:
            continue
        learned = {label: here[(label, first)]["mean"] >= LEARNED for label in labels if here.get((label, first))}
        for label in labels:
            if not learned.get(label, True):
                out.append(
                    Finding(
                        f"{encoding}, {seeds_text(seeds)}: {names[label]} answers "
                        f"{value_text(here[(label, first)])} of the queries at n = {_length(first, training_length)} "
                        f"(under {LEARNED:g}): it did not learn the task, so its accuracy at longer lengths says "
                        "nothing about extrapolation and is not compared",
                        None,
                        figure,
                    )
                )
        if not learned.get(baseline, False):
            continue
        base_name, base_value, rows = against_baseline(
            summary, "accuracy", "normalizer", {"positional": positional, "length": last}, names
        )
        compared = {names[label] for label, ok in learned.items() if ok}
        found = (base_name, base_value, [row for row in rows if row.label in compared])
        context = f"{encoding}, n = {_length(last, training_length)}, {seeds_text(seeds)}"
        out += extremes(context, "accuracy", found, figure)
        out += tally(context, found, figure)
    return out
