"""Training-loss curves, shared by the figures of the kinds that train models (length
generalisation, calibration, distillation): one line per model (its mean over seeds, with the
band of its 95% t interval when it has several), each model's final validation loss marked at
its last step."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from attnlab.figures import bands, style

# Curves of similar models lie on top of each other; a dash pattern per line keeps each visible.
DASHES = ["-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1))]


def draw_curves(ax: plt.Axes, curves: list[dict]) -> None:
    """Training-loss curves on `ax`: each curve a dict with label, color, steps, losses and
    optionally final (a validation loss, marked at the last step and given in the legend), ls
    (a line style; by default one of DASHES in turn), and low and high (a band around the losses)."""
    for i, curve in enumerate(curves):
        final = curve.get("final")
        label = curve["label"] if final is None else f"{curve['label']} (val {final:.3f})"
        dash = curve.get("ls", DASHES[i % len(DASHES)])
        ax.plot(curve["steps"], curve["losses"], color=curve["color"], lw=1.4, ls=dash, label=label)
        if curve.get("low") is not None and np.any(np.isfinite(curve["low"])):
            ax.fill_between(
                curve["steps"], curve["low"], curve["high"], color=curve["color"], alpha=bands.BAND_ALPHA, lw=0
            )
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
    later = [float(loss) for c in curves for loss in c["losses"][len(c["losses"]) // 4 :]]
    later += [c["final"] for c in curves if c.get("final") is not None]
    for c in curves:
        if c.get("low") is not None:
            band = np.concatenate([c["low"][len(c["low"]) // 4 :], c["high"][len(c["high"]) // 4 :]])
            later += band[np.isfinite(band)].tolist()
    if later:
        ax.set_ylim(min(later) * 0.97, max(later) * 1.03)
    ax.set_xlabel("optimizer step")
    ax.legend(frameon=False)


def seed_curve(runs: list[dict], series: str = "history") -> dict:
    """One model's curve over its seeds: steps and losses (the mean over `runs`, one record per
    seed, of record[series]'s loss at each step), with low and high (the 95% t band) when there
    are several seeds. The runs share their steps (one config trains every seed alike)."""
    steps = [entry["step"] for entry in runs[0][series]]
    curves = [[entry["loss"] for entry in run[series]] for run in runs]
    if any([entry["step"] for entry in run[series]] != steps for run in runs):
        raise ValueError(f"the seeds' {series} entries are at different steps; they cannot be averaged")
    mean, low, high = bands.curve_band(curves)
    return {"steps": steps, "losses": mean, **({"low": low, "high": high} if len(runs) > 1 else {})}
