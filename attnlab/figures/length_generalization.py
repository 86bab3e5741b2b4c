"""Figures of a length_generalization results file: training curves, loss vs position, and the
attention inside each trained model (max weight, entropy, zero fraction) vs position, per layer."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from attnlab.figures import style
from attnlab.figures.training import DASHES, draw_curves

LOSS_BINS = 24


def _by_label(records: list[dict], kind: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        if r.get("record") == kind:
            out.setdefault(r["normalizer"], []).append(r)
    return out


def training_curves(payload: dict, out_dir: Path, ylabel: str) -> list[Path]:
    """Training loss vs step, one curve per normalizer (shared with the needle figures)."""
    config, name = payload["config"], payload["experiment"]
    specs = config["normalizers"]
    colors = style.colors_for(specs)
    trained = _by_label(payload["records"], "training")
    curves = [
        {
            "label": style.display_label(spec),
            "color": colors[spec["label"]],
            "steps": [h["step"] for h in trained[spec["label"]][0]["history"]],
            "losses": [h["loss"] for h in trained[spec["label"]][0]["history"]],
            "final": trained[spec["label"]][0].get("validation_loss"),
        }
        for spec in specs
        if spec["label"] in trained
    ]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    draw_curves(ax, curves)
    model, training = config["model"], config["training"]
    ax.set_ylabel(ylabel)
    ax.set_title(
        f"{model['layers']} layers, width {model['width']}, {model['heads']} heads; trained at L = "
        f"{training['seq_len']}, batch {training['batch_size']}",
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
            x, y = _log_binned(rows[0]["per_position_loss"], LOSS_BINS)
            ax.plot(
                x, y, color=colors[spec["label"]], ls=DASHES[i % len(DASHES)], lw=1.5, label=style.display_label(spec)
            )
        _mark_training_length(ax, length)
        ax.set_xscale("log")
        ax.set_xlabel("position t + 1 (bytes of context)")
        theta = config["model"]["rope_theta"] * factor
        ax.set_title(f"RoPE θ = {theta:g}" + (" (as trained)" if factor == 1 else f" ({factor:g}× training θ)"))
    axes[0][0].set_ylabel("validation loss (nats per byte, log-binned)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right center", frameon=False)
    fig.suptitle(
        f"Loss vs position, trained at L = {length}, evaluated to {config['eval_length']} "
        f"(mean over {config['eval_windows']} validation windows)",
        fontsize=11,
    )
    return style.save(fig, out_dir / f"{name}_loss_vs_position")


def _per_layer(payload: dict, out_dir: Path, keys: list[tuple[str, str]], stem: str, title: str) -> list[Path]:
    """One row per statistic, one column per layer; lines per normalizer (theta as trained solid,
    raised dashed when evaluated)."""
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
                for r in evaluations.get(spec["label"], []):
                    as_trained = r["rope_theta_factor"] == 1.0
                    if not as_trained and len(config["rope_theta_factors"]) > 1 and key != "max_weight":
                        continue
                    ax.plot(
                        _bin_centers(r["position_edges"]),
                        r[key][layer],
                        color=colors[spec["label"]],
                        ls="-" if as_trained else "--",
                        lw=1.5 if as_trained else 1.0,
                        label=style.display_label(spec) if as_trained else None,
                    )
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
    paths = training_curves(payload, out_dir, "training loss (nats per byte)")
    paths += loss_vs_position(payload, out_dir)
    paths += _per_layer(
        payload,
        out_dir,
        [("max_weight", "max attention weight"), ("entropy", "attention entropy (nats)")],
        "attention_vs_position",
        f"Attention inside the trained models, mean over heads and windows (solid: θ as trained{note})",
    )
    paths += _per_layer(
        payload,
        out_dir,
        [("zero_fraction", "fraction of exact zeros"), ("support_size", "support size (keys)")],
        "sparsity_vs_position",
        "Sparsity inside the trained models, mean over heads and windows (θ as trained)",
    )
    return paths
