"""Figures of a needle results file: retrieval accuracy over context length x needle depth per
normalizer, retrieval accuracy vs context length with its 95% t interval over seeds and the
paired differences to softmax, the attention mass on the needle per layer and head, and the
training curves.

Heatmaps, masses and curves are means over the seeds; the intervals come from the results file's
"summary" (written when the sweep finished), or for a run still in progress from its records the
same way. A file of one seed (or written before seeds were swept: its records are seed 0) is
drawn as that one run, without intervals.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from attnlab.data.tasks import VALUE_ALPHABET
from attnlab.experiments import lm, needle
from attnlab.figures import bands, style
from attnlab.figures.findings import (
    Finding,
    Row,
    comparison_text,
    difference_text,
    one_seed,
    seed_count,
    seeds_text,
    significance,
    value_text,
)
from attnlab.figures.length_generalization import training_curves

LAYER_COLORS = ["#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#9c755f", "#edc948", "#ff9da7"]


def _cells(records: list[dict], label: str, factor: float) -> list[dict]:
    return [
        r
        for r in records
        if r.get("record") == "retrieval" and r["normalizer"] == label and r["rope_theta_factor"] == factor
    ]


def _summary(payload: dict) -> dict:
    """The results file's summary, or the same computed from its records (a run in progress)."""
    summary = payload.get("summary")
    if summary is not None:
        return summary
    config = payload["config"]
    return needle.summary_of(
        payload["records"], config["training"]["seq_len"], lm.baseline_label(config["normalizers"])
    )


def _seeds(records: list[dict]) -> int:
    return len(bands.seeds_in([r for r in records if r.get("record") == "retrieval"]))


def accuracy_heatmaps(payload: dict, out_dir: Path) -> list[Path]:
    """Sequence accuracy per (depth, context length) cell, one panel per normalizer and RoPE base
    (the mean over the seeds)."""
    config, name, records = payload["config"], payload["experiment"], payload["records"]
    specs, factors = config["normalizers"], config["rope_theta_factors"]
    lengths, depths = config["eval_lengths"], config["depths"]
    rows, cols = len(factors), len(specs)
    width = max(2.4, 0.6 * len(lengths)) * cols + 1.8
    height = max(2.0, 0.45 * len(depths)) * rows + 1.4
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False, layout="constrained")
    image = None
    for row, factor in enumerate(factors):
        for col, spec in enumerate(specs):
            ax = axes[row][col]
            found: dict[tuple[int, int], list[float]] = {}
            for r in _cells(records, spec["label"], factor):
                found.setdefault((depths.index(r["depth"]), lengths.index(r["length"])), []).append(
                    r["sequence_accuracy"]
                )
            grid = np.full((len(depths), len(lengths)), np.nan)
            for cell, values in found.items():
                grid[cell] = np.mean(values)
            image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="upper")
            for (i, j), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    ax.text(
                        j,
                        i,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="black" if value > 0.6 else "white",
                    )
            trained = sum(n <= config["training"]["seq_len"] for n in lengths)
            if 0 < trained < len(lengths):
                ax.axvline(trained - 0.5, color="white", lw=1.5, ls="--")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45, fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.grid(False)
            if row == 0:
                ax.set_title(style.display_label(spec), fontsize=9)
            if col == 0:
                theta = config["model"]["rope_theta"] * factor
                ax.set_ylabel(f"needle depth\n(RoPE θ = {theta:g})")
    fig.colorbar(image, ax=axes, shrink=0.8, label="retrieval accuracy (all digits right)")
    fig.supxlabel("context length n (bytes)", fontsize=10)
    seeds = _seeds(records)
    fig.suptitle(
        f"Needle retrieval, trained at L = {config['training']['seq_len']} (dashed: beyond L); "
        f"{config['eval_examples']} sequences per cell" + (f", mean over {seeds} seeds" if seeds > 1 else ""),
        fontsize=10,
    )
    return style.save(fig, out_dir / f"{name}_accuracy")


def accuracy_vs_length(payload: dict, out_dir: Path) -> list[Path]:
    """Per RoPE base (columns): top, sequence accuracy (the mean over depths) vs context length,
    one line per normalizer, mean over seeds with its 95% t interval; bottom (when a softmax
    normalizer ran), each other normalizer's paired difference to softmax (same seeds, same
    training and test sequences): bars that miss 0 mark a difference at the 95% level."""
    config, name = payload["config"], payload["experiment"]
    specs, factors, lengths = config["normalizers"], config["rope_theta_factors"], config["eval_lengths"]
    summary = _summary(payload)["retrieval"]
    colors = style.colors_for(specs)
    paired = summary["paired"]
    rows = 2 if paired else 1
    fig, axes = plt.subplots(
        rows, len(factors), figsize=(4.8 * len(factors) + 1.6, 3.6 * rows), squeeze=False, sharex=True,
        layout="constrained",
    )  # fmt: skip
    offsets = 2.0 ** np.linspace(-0.08, 0.08, len(specs)) if len(specs) > 1 else np.ones(1)
    for col, factor in enumerate(factors):
        panels = [(summary["groups"], axes[0][col])] + ([(paired, axes[1][col])] if paired else [])
        for entries, ax in panels:
            for i, spec in enumerate(specs):
                at = {e["length"]: e["sequence_accuracy"] for e in entries
                      if e["normalizer"] == spec["label"] and e["rope_theta_factor"] == factor}  # fmt: skip
                if not at:
                    continue
                mean, low, high = bands.from_summary([at.get(n) for n in lengths])
                ax.errorbar(
                    np.array(lengths) * offsets[i], mean, yerr=bands.errors(mean, low, high),
                    color=colors[spec["label"]], marker=style.MARKERS[i % len(style.MARKERS)], ms=4.5, lw=1.4,
                    capsize=2.5, label=style.display_label(spec),
                )  # fmt: skip
            ax.axvline(config["training"]["seq_len"], color="0.3", ls=":", lw=1.0)
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.minorticks_off()
        theta = config["model"]["rope_theta"] * factor
        axes[0][col].set_title(
            f"RoPE θ = {theta:g}" + (" (as trained)" if factor == 1 else f" ({factor:g}× training θ)")
        )
        axes[0][col].set_ylim(-0.03, 1.03)
        axes[-1][col].set_xlabel("context length n (bytes; dotted: L)")
        if paired:
            axes[1][col].axhline(0.0, color="black", lw=0.8)
    axes[0][0].set_ylabel("retrieval accuracy (all digits right)")
    if paired:
        axes[1][0].set_ylabel(f"accuracy − {paired[0]['against']['normalizer']}'s (paired by seed)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right center", frameon=False)
    seeds = max((len(g["seeds"]) for g in summary["groups"]), default=1)
    fig.suptitle(
        f"Needle retrieval vs context length, mean over depths; {bands.note(seeds)}",
        fontsize=10,
    )
    return style.save(fig, out_dir / f"{name}_accuracy_vs_length")


def needle_mass(payload: dict, out_dir: Path) -> list[Path]:
    """Mass on the needle at the first answer query, per layer and head, vs context length (theta
    as trained, mean over depths and seeds), with the mass uniform attention would give."""
    config, name, records = payload["config"], payload["experiment"], payload["records"]
    specs, lengths = config["normalizers"], config["eval_lengths"]
    factor = config["rope_theta_factors"][0]
    cols = len(specs)
    fig, axes = plt.subplots(1, cols, figsize=(3.4 * cols, 3.4), sharey=True, squeeze=False, layout="constrained")
    for ax, spec in zip(axes[0], specs, strict=True):
        cells = _cells(records, spec["label"], factor)
        if not cells:
            continue
        masses = np.array(
            [np.mean([r["needle_mass"] for r in cells if r["length"] == n], axis=0) for n in lengths]
        )  # [lengths, layers, heads]
        uniform = [np.mean([r["needle_mass_uniform"] for r in cells if r["length"] == n]) for n in lengths]
        for layer in range(masses.shape[1]):
            for head in range(masses.shape[2]):
                ax.plot(
                    lengths,
                    masses[:, layer, head],
                    color=LAYER_COLORS[layer % len(LAYER_COLORS)],
                    lw=1.2,
                    alpha=0.85,
                    marker="o",
                    ms=3,
                    label=f"layer {layer + 1}" if head == 0 else None,
                )
        ax.plot(lengths, uniform, color="black", ls="--", lw=1.0, label="uniform weights")
        ax.axvline(config["training"]["seq_len"], color="0.3", ls=":", lw=1.0)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length n (bytes)")
        ax.set_title(style.display_label(spec), fontsize=10)
    axes[0][0].set_ylabel("attention mass on the needle\n(first answer query, one line per head)")
    axes[0][-1].legend(frameon=False, fontsize=7.5)
    theta = config["model"]["rope_theta"] * factor
    seeds = _seeds(records)
    over = "depths" if seeds == 1 else f"depths and {seeds} seeds"
    fig.suptitle(f"Where the heads look when answering (RoPE θ = {theta:g}, mean over {over})", fontsize=11)
    return style.save(fig, out_dir / f"{name}_needle_mass")


def render(payload: dict, out_dir: Path) -> list[Path]:
    style.setup()
    paths = training_curves(payload, out_dir, "training loss on the answer digits (nats)")
    paths += accuracy_heatmaps(payload, out_dir)
    paths += accuracy_vs_length(payload, out_dir)
    paths += needle_mass(payload, out_dir)
    return paths


# A model that retrieves the needle in fewer than this fraction of the sequences at the training
# length did not learn the task (guessing every digit gets 10^-value_length).
LEARNED = 0.1


def _at_length(summary: dict, label: str, factor: float, length: int) -> tuple[dict | None, dict | None]:
    """(the summary group, the paired difference to the baseline) of one normalizer at one
    (RoPE factor, length) cell of the retrieval summary."""
    retrieval = summary["retrieval"]

    def pick(entries: list[dict]) -> dict | None:
        cell = (label, factor, length)
        return next((e for e in entries if (e["normalizer"], e["rope_theta_factor"], e["length"]) == cell), None)

    return pick(retrieval["groups"]), pick(retrieval["paired"])


def _theta(factor: float) -> str:
    return "RoPE θ as trained" if factor == 1.0 else f"RoPE θ × {factor:g} (no retraining)"


def findings(payload: dict) -> list:
    """Per RoPE factor: softmax's retrieval accuracy at the training length L and at the longest
    length; each other normalizer's against it at L (as trained) and at the longest length, paired
    by seed. A normalizer that retrieves fewer than LEARNED of the needles at L with the base as
    trained did not learn the task: said plainly, and its long-length accuracy is not compared."""
    config, name = payload["config"], payload["experiment"]
    summary = _summary(payload)
    names = {spec["label"]: style.display_label(spec) for spec in config["normalizers"]}
    baseline = lm.baseline_label(config["normalizers"])
    length, lengths = config["training"]["seq_len"], config["eval_lengths"]
    shorter = [n for n in lengths if n <= length]
    longest = lengths[-1]
    if baseline is None or not shorter:
        return []
    at_l = shorter[-1]
    where = f"L = {length}" if at_l == length else f"n = {at_l:,} (≤ L = {length})"
    far = f"n = {longest:,}" + (f" ({longest // length} L)" if longest % length == 0 else "")
    seeds = seed_count(summary["retrieval"]["groups"])
    figure = f"{name}_accuracy_vs_length.png"
    out = [one_seed(config)] if seeds == 1 else []
    digits = config.get("value_length", 4)
    chance = 1.0 / len(VALUE_ALPHABET)
    steps = config["training"]["steps"]

    learned = {}
    if 1.0 in config["rope_theta_factors"]:
        for spec in config["normalizers"]:
            group, _ = _at_length(summary, spec["label"], 1.0, at_l)
            if group is not None:
                learned[spec["label"]] = group["sequence_accuracy"]["mean"] >= LEARNED

    for factor in config["rope_theta_factors"]:
        context = f"{_theta(factor)}, {seeds_text(seeds)}"
        base_l, _ = _at_length(summary, baseline, factor, at_l)
        base_far, _ = _at_length(summary, baseline, factor, longest)
        if base_l is None or base_far is None:
            continue
        claim = (
            f"{context}: {names[baseline]} retrieves the needle (all {digits} digits right; mean over the depths) "
            f"in {value_text(base_l['sequence_accuracy'])} of the sequences at {where} and "
            f"{value_text(base_far['sequence_accuracy'])} at {far}"
        )
        if factor == 1.0 and not learned.get(baseline, True):
            claim += (
                f", under {LEARNED:g} at L: it did not learn the task at the training length in {steps:,} steps, "
                "so no comparison with it beyond L says anything about extrapolation"
            )
        out.append(Finding(claim, None, figure))
        for spec in config["normalizers"]:
            label = spec["label"]
            if label == baseline:
                continue
            group, difference = _at_length(summary, label, factor, at_l)
            if factor == 1.0 and group is not None and difference is not None:
                if learned.get(label, True):
                    row = Row(names[label], group["sequence_accuracy"], difference["sequence_accuracy"])
                    claim = (
                        f"At {where}, {context}, retrieval: "
                        f"{comparison_text(row, names[baseline], base_l['sequence_accuracy'])}"
                    )
                else:
                    base = base_l["sequence_accuracy"]["mean"]
                    claim = (
                        f"{names[label]} did not learn the task at the training length in {steps:,} steps "
                        f"({context}): at {where} it retrieves the needle in "
                        f"{value_text(group['sequence_accuracy'])} of the sequences (under {LEARNED:g}) against "
                        f"{names[baseline]}'s {base:.3f}, {difference_text(difference['sequence_accuracy'])}, and gets "
                        f"{value_text(group['digit_accuracy'])} of the digits right (guessing: {chance:g}), so its "
                        "accuracy beyond L says nothing about extrapolation"
                    )
                out.append(Finding(claim, significance(difference["sequence_accuracy"]), figure))
            group, difference = _at_length(summary, label, factor, longest)
            if longest > length and learned.get(label, True) and group is not None and difference is not None:
                row = Row(names[label], group["sequence_accuracy"], difference["sequence_accuracy"])
                compared = comparison_text(row, names[baseline], base_far["sequence_accuracy"])
                significant = significance(difference["sequence_accuracy"])
                out.append(Finding(f"At {far}, {context}, retrieval: {compared}", significant, figure))
    return out
