"""Figures of the fading_synthetic results: max weight and support vs n, per normalizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from attnlab.figures import style


def _series(records: list[dict], label: str, key: str, **match: Any) -> tuple[list, list]:
    rows = sorted(
        (r for r in records if r["normalizer"] == label and all(r.get(k) == v for k, v in match.items())),
        key=lambda r: r["n"],
    )
    return [r["n"] for r in rows if r.get(key) is not None], [r[key] for r in rows if r.get(key) is not None]


def _panel(ax, records, specs, colors, *, key, theory_key=None, ylabel, title, **match) -> None:
    for i, spec in enumerate(specs):
        label = spec["label"]
        n, y = _series(records, label, key, **match)
        if not n:
            continue
        ax.plot(
            n,
            y,
            marker=style.MARKERS[i % len(style.MARKERS)],
            ms=4,
            mfc="none",
            lw=1.5,
            color=colors[label],
            label=style.display_label(spec),
        )
        if theory_key:
            tn, ty = _series(records, label, theory_key, **match)
            if tn:
                ax.plot(tn, ty, ls="--", lw=1.2, color=colors[label], alpha=0.9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("row length n (keys)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def render(payload: dict, out_dir: Path) -> list[Path]:
    style.setup()
    config, records = payload["config"], payload["records"]
    specs = config["normalizers"]
    colors = style.colors_for(specs)
    sigmas = config["sigmas"]
    name = payload["experiment"]
    paths = []

    panels = 1 + len(sigmas)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.8), sharey=True, squeeze=False, layout="constrained")
    axes = axes[0]
    gap = config["peak_logit"] - config["rest_logit"]
    _panel(
        axes[0],
        records,
        specs,
        colors,
        key="max_weight",
        theory_key="max_weight_theory",
        ylabel="max attention weight",
        title=f"one logit {config['peak_logit']:g}, rest {config['rest_logit']:g} (gap {gap:g})",
        input="peak",
    )
    for ax, sigma in zip(axes[1:], sigmas, strict=True):
        _panel(
            ax,
            records,
            specs,
            colors,
            key="max_weight",
            theory_key="max_weight_theory",
            ylabel="mean max attention weight",
            title=f"i.i.d. N(0, {sigma:g}²) logits, {config['seeds']} rows",
            input="gaussian",
            sigma=sigma,
        )
    for ax in axes:
        n_all = sorted({r["n"] for r in records})
        if n_all:
            ax.plot(n_all, [1.0 / n for n in n_all], color="0.5", lw=0.8, ls=":", label="uniform 1/n")
    axes[0].plot([], [], color="0.3", ls="--", lw=1.2, label="closed form")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", frameon=False)
    fig.suptitle("Attention fading: largest weight vs row length (dashed: closed form)")
    paths += style.save(fig, out_dir / f"{name}_max_weight")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), squeeze=False, layout="constrained")
    axes = axes[0]
    sigma = 1.0 if 1.0 in sigmas else sigmas[len(sigmas) // 2]
    _panel(
        axes[0],
        records,
        specs,
        colors,
        key="support_size",
        ylabel="support size (exact non-zeros)",
        title=f"support, N(0, {sigma:g}²) logits",
        input="gaussian",
        sigma=sigma,
    )
    _panel(
        axes[1],
        records,
        specs,
        colors,
        key="effective_support",
        ylabel="effective support 1 / Σ p²",
        title=f"effective support, N(0, {sigma:g}²) logits",
        input="gaussian",
        sigma=sigma,
    )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", frameon=False)
    paths += style.save(fig, out_dir / f"{name}_support")

    if any(r.get("input") == "required_gap" for r in records):
        paths += _required_gap_figure(records, specs, colors, config, out_dir / f"{name}_required_gap")
    return paths


def _required_gap_figure(records, specs, colors, config, stem: Path) -> list[Path]:
    """The SSMax paper's Figure 3: the top logit needed for a top weight of target_weight, vs n."""
    fig, ax = plt.subplots(figsize=(6.6, 4.0), layout="constrained")
    _panel(
        ax,
        records,
        specs,
        colors,
        key="required_gap",
        theory_key="required_gap_theory",
        ylabel="required top logit g (others 0)",
        title=f"logit needed for a top weight of {config.get('target_weight', 0.5):g} (dashed: closed form)",
        input="required_gap",
    )
    gaps = [r["required_gap"] for r in records if r.get("input") == "required_gap" and r.get("required_gap")]
    if gaps and max(gaps) > 100 * min(gaps):
        # Gaps that differ by orders of magnitude (StableMax needs g = n - 2, softpick almost
        # nothing) only show side by side on a log axis, where a closed form <= 0 (a negative
        # SSMax factor at small n) has no place.
        for line in ax.get_lines():
            y = np.asarray(line.get_ydata(), float)
            line.set_ydata(np.where(y > 0, y, np.nan))
        ax.set_yscale("log")
    else:
        ax.set_yscale("linear")
        ax.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", frameon=False)
    return style.save(fig, stem)
