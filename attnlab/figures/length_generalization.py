"""Figures of a length_generalization results file: training curves, loss vs position, the
losses within and beyond L per normalizer with their paired differences to softmax, and the
attention inside each trained model (max weight, entropy, zero fraction) vs position, per layer.

Every curve is the mean over the seeds with its 95% t interval as a band (`bands`); the losses
per normalizer come from the results file's "summary" (written when the sweep finished), or for
a run still in progress from its records the same way. A file of one seed (or written before
seeds were swept: its records are seed 0) is drawn as that one run, without bands.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from attnlab.experiments import intervals, length_generalization, lm
from attnlab.figures import bands, style
from attnlab.figures.findings import (
    Finding,
    against_baseline,
    difference_text,
    extremes,
    interval_text,
    one_seed,
    paired,
    seed_count,
    seeds_text,
    significance,
    tally,
)
from attnlab.figures.training import DASHES, draw_curves, seed_curve

LOSS_BINS = 24
# The losses the summary figure shows per normalizer, with their legend names and markers.
SUMMARY_LOSSES = (("loss_within", "within L", "o"), ("loss_beyond", "beyond L", "s"),
                  ("loss_last_eighth", "last eighth", "^"))  # fmt: skip


def _by_label(records: list[dict], kind: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        if r.get("record") == kind:
            out.setdefault(r["normalizer"], []).append(r)
    return out


def _final(runs: list[dict]) -> float | None:
    """The mean over seeds of the runs' validation loss (None when they have none)."""
    losses = [r["validation_loss"] for r in runs if r.get("validation_loss") is not None]
    return float(np.mean(losses)) if losses else None


def training_curves(payload: dict, out_dir: Path, ylabel: str) -> list[Path]:
    """Training loss vs step, one curve per normalizer, the mean over seeds with its 95% t band
    (shared with the needle figures)."""
    config, name = payload["config"], payload["experiment"]
    specs = config["normalizers"]
    colors = style.colors_for(specs)
    trained = _by_label(payload["records"], "training")
    curves = [
        {
            "label": style.display_label(spec),
            "color": colors[spec["label"]],
            **seed_curve(trained[spec["label"]]),
            "final": _final(trained[spec["label"]]),
        }
        for spec in specs
        if spec["label"] in trained
    ]
    seeds = len(bands.seeds_in([r for runs in trained.values() for r in runs]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    draw_curves(ax, curves)
    model, training = config["model"], config["training"]
    ax.set_ylabel(ylabel)
    ax.set_title(
        f"{model['layers']} layers, width {model['width']}, {model['heads']} heads; trained at L = "
        f"{training['seq_len']}, batch {training['batch_size']}\n{bands.note(seeds)}",
        fontsize=10,
    )
    return style.save(fig, out_dir / f"{name}_training_loss")


def _log_binned(values: list, num: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions 1..T (row length) and values averaged over about `num` log-spaced bins."""
    y = np.array([np.nan if v is None else v for v in values], dtype=float)
    edges = np.unique(np.round(np.geomspace(1, len(y) + 1, num + 1)).astype(int) - 1)
    edges = np.concatenate([edges[edges < len(y)], [len(y)]])
    return _bin_centers(edges), np.array([np.nanmean(y[a:b]) for a, b in itertools.pairwise(edges)])


def _bin_centers(edges: list[int]) -> np.ndarray:
    """Geometric centre of each bin of row lengths t + 1 in [a + 1, b]."""
    return np.array([np.sqrt((a + 1) * b) for a, b in itertools.pairwise(edges)])


def _mark_training_length(ax: plt.Axes, length: int) -> None:
    ax.axvline(length, color="0.3", ls=":", lw=1.0)
    ax.annotate("L", (length, 1.0), xycoords=("data", "axes fraction"), ha="right", va="top", fontsize=8)


def loss_vs_position(payload: dict, out_dir: Path) -> list[Path]:
    config, name = payload["config"], payload["experiment"]
    specs = config["normalizers"]
    colors = style.colors_for(specs)
    evaluations = _by_label(payload["records"], "evaluation")
    factors = config["rope_theta_factors"]
    length = config["training"]["seq_len"]
    fig, axes = plt.subplots(
        1, len(factors), figsize=(5.0 * len(factors), 4.0), sharey=True, squeeze=False, layout="constrained"
    )
    for ax, factor in zip(axes[0], factors, strict=True):
        for i, spec in enumerate(specs):
            rows = [r for r in evaluations.get(spec["label"], []) if r["rope_theta_factor"] == factor]
            if not rows:
                continue
            binned = [_log_binned(r["per_position_loss"], LOSS_BINS) for r in rows]  # one per seed
            bands.draw(
                ax, binned[0][0], *bands.curve_band([y for _, y in binned]), color=colors[spec["label"]],
                ls=DASHES[i % len(DASHES)], lw=1.5, label=style.display_label(spec),
            )  # fmt: skip
        _mark_training_length(ax, length)
        ax.set_xscale("log")
        ax.set_xlabel("position t + 1 (bytes of context)")
        theta = config["model"]["rope_theta"] * factor
        ax.set_title(f"RoPE θ = {theta:g}" + (" (as trained)" if factor == 1 else f" ({factor:g}× training θ)"))
    axes[0][0].set_ylabel("validation loss (nats per byte, log-binned)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right center", frameon=False)
    seeds = len(bands.seeds_in([r for rows in evaluations.values() for r in rows]))
    fig.suptitle(
        f"Loss vs position, trained at L = {length}, evaluated to {config['eval_length']} "
        f"(mean over {config['eval_windows']} validation windows; {bands.note(seeds)})",
        fontsize=11,
    )
    return style.save(fig, out_dir / f"{name}_loss_vs_position")


def _summary(payload: dict) -> dict:
    """The results file's summary, or the same computed from its records (a run in progress)."""
    summary = payload.get("summary")
    if summary is not None:
        return summary
    return length_generalization.summary_of(payload["records"], lm.baseline_label(payload["config"]["normalizers"]))


def losses_by_normalizer(payload: dict, out_dir: Path) -> list[Path]:
    """Per RoPE factor (columns): top, each normalizer's validation loss within L, beyond L and
    over the last eighth of the window, mean over seeds with its 95% t interval; bottom (when a
    softmax normalizer ran), each other normalizer's paired difference to softmax (same seeds,
    same data): bars that miss 0 mark a difference at the 95% level."""
    config, name = payload["config"], payload["experiment"]
    specs, factors = config["normalizers"], config["rope_theta_factors"]
    summary = _summary(payload)["evaluation"]
    paired = summary["paired"]
    rows = 2 if paired else 1
    fig, axes = plt.subplots(
        rows, len(factors), figsize=(max(4.0, 0.55 * len(specs) + 1.5) * len(factors), 3.6 * rows),
        squeeze=False, sharex=True, layout="constrained",
    )  # fmt: skip
    labels = [spec["label"] for spec in specs]
    x = np.arange(len(labels), dtype=float)
    shift = np.linspace(-0.22, 0.22, len(SUMMARY_LOSSES))
    for col, factor in enumerate(factors):
        panels = [("groups", summary["groups"], axes[0][col])]
        if paired:
            panels.append(("paired", paired, axes[1][col]))
        for which, entries, ax in panels:
            at = {e["normalizer"]: e for e in entries if e["rope_theta_factor"] == factor}
            for (metric, legend, marker), dx in zip(SUMMARY_LOSSES, shift, strict=True):
                mean, low, high = bands.from_summary([(at.get(label) or {}).get(metric) for label in labels])
                ax.errorbar(
                    x + dx, mean, yerr=bands.errors(mean, low, high), marker=marker, ms=4.5, ls="none",
                    capsize=2.5, lw=1.2, label=legend,
                )  # fmt: skip
            if which == "paired":
                ax.axhline(0.0, color="black", lw=0.8)
                ax.set_ylabel(f"loss − {paired[0]['against']['normalizer']}'s (paired by seed)")
            else:
                theta = config["model"]["rope_theta"] * factor
                ax.set_title(f"RoPE θ = {theta:g}" + (" (as trained)" if factor == 1 else f" ({factor:g}× training θ)"))
                ax.set_ylabel("validation loss (nats per byte)")
            ax.set_xticks(x, [style.display_label(spec) for spec in specs], rotation=35, ha="right", fontsize=8)
    axes[0][0].legend(frameon=False, fontsize=8)
    seeds = max((len(g["seeds"]) for g in summary["groups"]), default=1)
    fig.suptitle(
        f"Loss per normalizer, trained at L = {config['training']['seq_len']}, evaluated to "
        f"{config['eval_length']} ({bands.note(seeds)})",
        fontsize=11,
    )
    return style.save(fig, out_dir / f"{name}_losses")


def _per_layer(payload: dict, out_dir: Path, keys: list[tuple[str, str]], stem: str, title: str) -> list[Path]:
    """One row per statistic, one column per layer; lines per normalizer, the mean over seeds
    (theta as trained solid, with its 95% t band; raised dashed when evaluated)."""
    config, name = payload["config"], payload["experiment"]
    specs = config["normalizers"]
    colors = style.colors_for(specs)
    evaluations = _by_label(payload["records"], "evaluation")
    layers = config["model"]["layers"]
    fig, axes = plt.subplots(
        len(keys), layers, figsize=(3.6 * layers, 3.2 * len(keys)), squeeze=False, sharex=True, layout="constrained"
    )
    for row, (key, ylabel) in enumerate(keys):
        for layer in range(layers):
            ax = axes[row][layer]
            for spec in specs:
                for factor in config["rope_theta_factors"]:
                    runs = [r for r in evaluations.get(spec["label"], []) if r["rope_theta_factor"] == factor]
                    as_trained = factor == 1.0
                    if not runs or (not as_trained and len(config["rope_theta_factors"]) > 1 and key != "max_weight"):
                        continue
                    mean, low, high = bands.curve_band([r[key][layer] for r in runs])
                    if not as_trained:
                        low = high = np.full_like(mean, np.nan)  # the raised base's band would hide the others
                    bands.draw(
                        ax, _bin_centers(runs[0]["position_edges"]), mean, low, high, color=colors[spec["label"]],
                        ls="-" if as_trained else "--", lw=1.5 if as_trained else 1.0,
                        label=style.display_label(spec) if as_trained else None,
                    )  # fmt: skip
            _mark_training_length(ax, config["training"]["seq_len"])
            ax.set_xscale("log")
            if key == "max_weight":
                ax.set_yscale("log")
            if row == 0:
                ax.set_title(f"layer {layer + 1}")
            if row == len(keys) - 1:
                ax.set_xlabel("query position t + 1 (keys visible)")
            if layer == 0:
                ax.set_ylabel(ylabel)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right center", frameon=False)
    fig.suptitle(title, fontsize=11)
    return style.save(fig, out_dir / f"{name}_{stem}")


def render(payload: dict, out_dir: Path) -> list[Path]:
    style.setup()
    raised = [f for f in payload["config"]["rope_theta_factors"] if f != 1.0]
    note = f"; dashed: RoPE θ × {raised[0]:g}" if raised else ""
    seeds = bands.note(len(bands.seeds_in([r for r in payload["records"] if r.get("record") == "evaluation"])))
    paths = training_curves(payload, out_dir, "training loss (nats per byte)")
    paths += loss_vs_position(payload, out_dir)
    paths += losses_by_normalizer(payload, out_dir)
    paths += _per_layer(
        payload,
        out_dir,
        [("max_weight", "max attention weight"), ("entropy", "attention entropy (nats)")],
        "attention_vs_position",
        f"Attention inside the trained models, mean over heads and windows (solid: θ as trained{note}); {seeds}",
    )
    paths += _per_layer(
        payload,
        out_dir,
        [("zero_fraction", "fraction of exact zeros"), ("support_size", "support size (keys)")],
        "sparsity_vs_position",
        f"Sparsity inside the trained models, mean over heads and windows (θ as trained); {seeds}",
    )
    return paths


# A map whose loss beyond L exceeds its loss within L by at most this much (nats per byte) does
# not climb beyond L.
FLAT = 0.05


def _rises(records: list[dict], factor: float) -> dict[str, dict[int, float]]:
    """label -> seed -> loss beyond L minus loss within L, from the evaluation records at `factor`."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        if r.get("record") == "evaluation" and r["rope_theta_factor"] == factor and r.get("loss_beyond") is not None:
            out.setdefault(r["normalizer"], {})[lm.seed_of(r)] = r["loss_beyond"] - r["loss_within"]
    return out


def _theta(factor: float) -> str:
    return "RoPE θ as trained" if factor == 1.0 else f"RoPE θ × {factor:g} (no retraining)"


def findings(payload: dict) -> list:
    """Per RoPE factor: the normalizers with the lowest and the highest loss beyond L against
    softmax's (paired by seed), and with several seeds which are below, above or level with it;
    the same within L with the base as trained; and which maps' loss does not climb beyond L
    (beyond minus within at most FLAT), against softmax's climb."""
    config, name = payload["config"], payload["experiment"]
    evaluation = _summary(payload)["evaluation"]
    names = {spec["label"]: style.display_label(spec) for spec in config["normalizers"]}
    length, eval_length = config["training"]["seq_len"], config["eval_length"]
    seeds = seed_count(evaluation["groups"])
    losses, curves = f"{name}_losses.png", f"{name}_loss_vs_position.png"
    out = [one_seed(config)] if seeds == 1 else []
    what = "loss (nats per byte)"
    for factor in config["rope_theta_factors"]:
        if eval_length > length:
            context = f"Beyond L (positions {length:,} to {eval_length - 1:,}), {_theta(factor)}, {seeds_text(seeds)}"
            found = against_baseline(evaluation, "loss_beyond", "normalizer", {"rope_theta_factor": factor}, names)
            out += extremes(context, what, found, losses)
            if factor == 1.0:
                out += tally(context, found, losses)
        if factor == 1.0:
            context = f"Within L = {length}, {_theta(factor)}, {seeds_text(seeds)}"
            found = against_baseline(evaluation, "loss_within", "normalizer", {"rope_theta_factor": factor}, names)
            out += extremes(context, what, found, losses)
    out += _flat(payload, names, seeds, curves)
    return out


def _flat(payload: dict, names: dict[str, str], seeds: int, figure: str) -> list:
    """Which maps' loss does not climb beyond L (RoPE θ as trained), each against softmax's climb,
    and the range of the others' climbs."""
    config = payload["config"]
    if 1.0 not in config["rope_theta_factors"] or config["eval_length"] <= config["training"]["seq_len"]:
        return []
    rises = _rises(payload["records"], 1.0)
    order = [spec["label"] for spec in config["normalizers"] if spec["label"] in rises]
    means = {label: float(np.mean(list(rises[label].values()))) for label in order}
    baseline = lm.baseline_label(config["normalizers"])
    context = f"RoPE θ as trained, {seeds_text(seeds)}"
    out = []
    flat = [label for label in order if means[label] <= FLAT]
    for label in flat:
        rise = intervals.t_interval(list(rises[label].values())).to_json()
        claim = (
            f"{names[label]}'s loss does not climb beyond L ({context}): its loss beyond L minus within L "
            f"(nats per byte) is {interval_text(rise, signed=True)}"
        )
        significant = None
        if baseline in rises and label != baseline:
            difference = paired(rises[label], rises[baseline])
            claim += f" against {names[baseline]}'s {means[baseline]:+.3f}, {difference_text(difference)}"
            significant = significance(difference)
        out.append(Finding(claim, significant, figure))
    climbing = sorted((means[label], names[label]) for label in order if label not in flat)
    if climbing:
        (low, lowest), (high, highest) = climbing[0], climbing[-1]
        every = "Every other normalizer's" if flat else "Every normalizer's"
        span = f"by {low:+.3f} ({lowest})" + (f" to {high:+.3f} ({highest})" if len(climbing) > 1 else "")
        over = "; beyond minus within, the mean over seeds" if seeds > 1 else ""
        claim = f"{every} loss climbs beyond L ({context}{over}): {span}"
        if baseline in means and baseline not in flat:
            claim += f"; {names[baseline]}'s by {means[baseline]:+.3f}"
        out.append(Finding(claim, None, figure))
    return out
