"""Figures of a train_lm_benchmark results file: training loss curves, one line per normalizer,
with each model's final validation loss marked at its last step."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from attnlab.figures import style

# Benchmark names that are not registry names, mapped to the registry colour they share a family with.
FAMILY = {"entmax_learned_alpha": "entmax"}
LABELS = {"entmax_learned_alpha": "α-entmax (learned α)"}
# Curves of similar models lie on top of each other; a dash pattern per line keeps each visible.
DASHES = ["-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1))]


def render(payload: dict, out_dir: Path) -> list[Path]:
    """One figure: training loss (nats per byte) vs step for every normalizer in the file."""
    style.setup()
    records = payload["records"]
    name = payload["experiment"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, r in enumerate(records):
        key = r["normalizer"]
        color = style.COLORS.get(FAMILY.get(key, key), "#7f7f7f")
        label = LABELS.get(key, style.LABELS.get(key, key))
        steps = [h["step"] for h in r["history"]]
        losses = [h["loss"] for h in r["history"]]
        ax.plot(
            steps,
            losses,
            color=color,
            lw=1.4,
            ls=DASHES[i % len(DASHES)],
            label=f"{label} (val {r['validation_loss']:.3f})",
        )
        ax.plot(
            [steps[-1]],
            [r["validation_loss"]],
            marker=style.MARKERS[i % len(style.MARKERS)],
            color=color,
            ms=6,
            ls="none",
        )
    # Focus on the last three quarters of training, where the normalizers differ.
    later = [h["loss"] for r in records for h in r["history"][len(r["history"]) // 4 :]]
    later += [r["validation_loss"] for r in records]
    if later:
        ax.set_ylim(min(later) * 0.97, max(later) * 1.03)
    config = payload["config"]
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats per byte, mean over 10 steps)")
    tokens = config["batch_size"] * config["seq_len"]
    ax.set_title(
        f"Byte-level LM on the stdlib corpus: {config['layers']} layers, width {config['width']}, "
        f"context {config['seq_len']}\n({tokens:,} tokens per step; markers: validation loss at the end)",
        fontsize=10,
    )
    ax.legend(frameon=False)
    return style.save(fig, out_dir / f"{name}_training_loss")
