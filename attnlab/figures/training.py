"""Training-loss curves, shared by the figures of the kinds that train models (length
generalisation, calibration, distillation): one line per model, each model's final validation
loss marked at its last step."""

from __future__ import annotations

import matplotlib.pyplot as plt

from attnlab.figures import style

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
