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


def draw_curves(ax: plt.Axes, curves: list[dict]) -> None:
    """Training-loss curves on `ax`: each curve a dict with label, color, steps, losses and
    optionally final (a validation loss, marked at the last step and given in the legend) and ls
    (a line style; by default one of DASHES in turn)."""
    for i, curve in enumerate(curves):
        final = curve.get("final")
        label = curve["label"] if final is None else f"{curve['label']} (val {final:.3f})"
        dash = curve.get("ls", DASHES[i % len(DASHES)])
        ax.plot(curve["steps"], curve["losses"], color=curve["color"], lw=1.4, ls=dash, label=label)
        if final is not None:
            ax.plot(
                [curve["steps"][-1]],
                [final],
                marker=style.MARKERS[i % len(style.MARKERS)],
                color=curve["color"],
                ms=6,
                ls="none",
            )
    # Focus on the last three quarters of training, where the normalizers differ.
    later = [loss for c in curves for loss in c["losses"][len(c["losses"]) // 4 :]]
    later += [c["final"] for c in curves if c.get("final") is not None]
    if later:
        ax.set_ylim(min(later) * 0.97, max(later) * 1.03)
    ax.set_xlabel("optimizer step")
    ax.legend(frameon=False)


def render(payload: dict, out_dir: Path) -> list[Path]:
    """One figure: training loss (nats per byte) vs step for every normalizer in the file."""
    style.setup()
    records = payload["records"]
    name = payload["experiment"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    curves = []
    for r in records:
        key = r["normalizer"]
        curves.append(
            {
                "label": LABELS.get(key, style.LABELS.get(key, key)),
                "color": style.COLORS.get(FAMILY.get(key, key), "#7f7f7f"),
                "steps": [h["step"] for h in r["history"]],
                "losses": [h["loss"] for h in r["history"]],
                "final": r["validation_loss"],
            }
        )
    draw_curves(ax, curves)
    config = payload["config"]
    ax.set_ylabel("training loss (nats per byte, mean over 10 steps)")
    tokens = config["batch_size"] * config["seq_len"]
    ax.set_title(
        f"Byte-level LM on the stdlib corpus: {config['layers']} layers, width {config['width']}, "
        f"context {config['seq_len']}\n({tokens:,} tokens per step; markers: validation loss at the end)",
        fontsize=10,
    )
    return style.save(fig, out_dir / f"{name}_training_loss")
