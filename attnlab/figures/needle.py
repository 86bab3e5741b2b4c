"""Figures of a needle results file: retrieval accuracy over context length x needle depth per
normalizer, the attention mass on the needle per layer and head, and the training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from attnlab.figures import style
from attnlab.figures.length_generalization import training_curves

LAYER_COLORS = ["#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#9c755f", "#edc948", "#ff9da7"]


def _cells(records: list[dict], label: str, factor: float) -> list[dict]:
    return [
        r
        for r in records
        if r.get("record") == "retrieval" and r["normalizer"] == label and r["rope_theta_factor"] == factor
    ]


def accuracy_heatmaps(payload: dict, out_dir: Path) -> list[Path]:
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
            grid = np.full((len(depths), len(lengths)), np.nan)
            for r in _cells(records, spec["label"], factor):
                grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["sequence_accuracy"]
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
    fig.suptitle(
        f"Needle retrieval, trained at L = {config['training']['seq_len']} (dashed: beyond L); "
        f"{config['eval_examples']} sequences per cell",
        fontsize=10,
    )
    return style.save(fig, out_dir / f"{name}_accuracy")


def needle_mass(payload: dict, out_dir: Path) -> list[Path]:
    """Mass on the needle at the first answer query, per layer and head, vs context length (theta
    as trained, mean over depths), with the mass uniform attention would give."""
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
    fig.suptitle(f"Where the heads look when answering (RoPE θ = {theta:g}, mean over depths)", fontsize=11)
    return style.save(fig, out_dir / f"{name}_needle_mass")


def render(payload: dict, out_dir: Path) -> list[Path]:
    style.setup()
    paths = training_curves(payload, out_dir, "training loss on the answer digits (nats)")
    paths += accuracy_heatmaps(payload, out_dir)
    paths += needle_mass(payload, out_dir)
    return paths
