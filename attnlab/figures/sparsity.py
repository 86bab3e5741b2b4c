"""Figures of the sparsity results: exact-zero fraction and support size vs row length and logit scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter

from attnlab.figures import style


def _select(records: list[dict], **match: Any) -> list[dict]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def _curves(ax, records, specs, colors, *, x: str, y: str, band: bool = False, **match) -> None:
    """One line per normalizer: y against x over the records matching `match` (shaded ± std if band)."""
    for i, spec in enumerate(specs):
        rows = sorted(_select(records, normalizer=spec["label"], **match), key=lambda r: r[x])
        if not rows:
            continue
        xs, ys = [r[x] for r in rows], [r[y] for r in rows]
        color = colors[spec["label"]]
        ax.plot(
            xs,
            ys,
            marker=style.MARKERS[i % len(style.MARKERS)],
            ms=4,
            mfc="none",
            lw=1.5,
            color=color,
            label=style.display_label(spec),
        )
        if band:
            low = [max(0.0, r[y] - r[f"{y}_std"]) for r in rows]
            high = [min(1.0, r[y] + r[f"{y}_std"]) for r in rows]
            ax.fill_between(xs, low, high, color=color, alpha=0.12, lw=0)


def _dense_reference(ax, ns: list[int]) -> None:
    if ns:
        ax.plot(ns, ns, color="0.5", lw=0.8, ls=":", label="dense: support = n")


def _log_x(ax, ticks: list[float] | None = None) -> None:
    """Log x axis labelled at its decades only, or at `ticks` (written as plain numbers) when given."""
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    if ticks is not None:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])


def _legend(fig, ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", frameon=False)


def _zero_fraction_axes(ax) -> None:
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("exact-zero fraction (zeros / n)")


def render(payload: dict, out_dir: Path) -> list[Path]:
    style.setup()
    config, records = payload["config"], payload["records"]
    specs = config["normalizers"]
    colors = style.colors_for(specs)
    name = payload["experiment"]
    paths = []
    synthetic = _select(records, input="synthetic")
    model = _select(records, input="model")
    if synthetic:
        paths += _synthetic_vs_n(synthetic, specs, colors, config, out_dir / f"{name}_vs_n")
        paths += _synthetic_vs_scale(synthetic, specs, colors, config, out_dir / f"{name}_vs_scale")
    for scale in config.get("model_scales", []):
        rows = _select(model, scale=scale)
        if rows:
            stem = f"{name}_model" if scale == 1.0 else f"{name}_model_scale{scale:g}"
            paths += _model_figure(rows, specs, colors, config, scale, out_dir / stem)
    return paths


def _synthetic_vs_n(records, specs, colors, config, stem: Path) -> list[Path]:
    """Top row: exact-zero fraction vs n; bottom row: support size vs n; one column per scale."""
    scales = config["scales"]
    fig, axes = plt.subplots(
        2,
        len(scales),
        figsize=(3.6 * len(scales) + 1.2, 6.6),
        sharex=True,
        sharey="row",
        squeeze=False,
        layout="constrained",
    )
    ns = sorted({r["n"] for r in records})
    for column, scale in enumerate(scales):
        top, bottom = axes[0, column], axes[1, column]
        _curves(top, records, specs, colors, x="n", y="zero_fraction", band=True, scale=scale)
        _zero_fraction_axes(top)
        top.set_title(f"logits i.i.d. N(0, {scale:g}²)")
        _curves(bottom, records, specs, colors, x="n", y="support_size", scale=scale)
        _dense_reference(bottom, ns)
        bottom.set_yscale("log")
        bottom.set_ylabel("support size (non-zero weights)")
        bottom.set_xlabel("row length n (keys)")
        for ax in (top, bottom):
            _log_x(ax)
            ax.label_outer()
    _legend(fig, axes[1, 0])
    fig.suptitle(f"Sparsity vs row length on Gaussian logits, mean of {config['seeds']} rows per point (band: ± 1 std)")
    return style.save(fig, stem)


def _synthetic_vs_scale(records, specs, colors, config, stem: Path) -> list[Path]:
    n = max(r["n"] for r in records)
    rows = _select(records, n=n)
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.7), squeeze=False, layout="constrained")
    axes = axes[0]
    _curves(axes[0], rows, specs, colors, x="scale", y="zero_fraction", band=True)
    _zero_fraction_axes(axes[0])
    axes[0].set_title("exact-zero fraction")
    _curves(axes[1], rows, specs, colors, x="scale", y="support_size")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("support size (non-zero weights)")
    axes[1].set_title("support size")
    for ax in axes:
        _log_x(ax, sorted(config["scales"]))
        ax.set_xlabel("logit scale σ (logits ~ N(0, σ²))")
    _legend(fig, axes[0])
    fig.suptitle(f"Sparsity vs logit scale at n = {n:,} keys, mean of {config['seeds']} rows")
    return style.save(fig, stem)


def _model_figure(records, specs, colors, config, scale: float, stem: Path) -> list[Path]:
    layers = sorted({r["layer"] for r in records})
    fig, axes = plt.subplots(
        2,
        len(layers),
        figsize=(max(3.6 * len(layers), 6.0) + 1.2, 6.6),
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    ns = sorted({r["n"] for r in records})
    for column, layer in enumerate(layers):
        top, bottom = axes[0, column], axes[1, column]
        _curves(top, records, specs, colors, x="n", y="zero_fraction", band=True, layer=layer)
        _zero_fraction_axes(top)
        top.set_title(f"layer {layer + 1} of {len(layers)}")
        _curves(bottom, records, specs, colors, x="n", y="support_size", layer=layer)
        _dense_reference(bottom, ns)
        bottom.set_yscale("log")
        bottom.set_ylabel("support size (non-zero weights)")
        bottom.set_xlabel("row length n (query position + 1)")
        for ax in (top, bottom):
            _log_x(ax)
    for ax in axes[:, 1:].flat:
        ax.set_ylabel("")
    _legend(fig, axes[1, 0])
    loss = records[0].get("model_validation_loss")
    scaled = "" if scale == 1.0 else f" × {scale:g}"
    plural = "layer" if len(layers) == 1 else "layers"
    # [model] / [training] tables; results written before them have flat model_width... keys.
    width = config["model"]["width"] if "model" in config else config["model_width"]
    heads = config["model"]["heads"] if "model" in config else config["model_heads"]
    steps = config["training"]["steps"] if "training" in config else config["model_steps"]
    fig.suptitle(
        f"Sparsity of a trained softmax LM's causal attention logits{scaled} through each normalizer\n"
        f"{len(layers)} {plural}, width {width}, {steps} steps, validation loss "
        f"{loss:.2f} nats/byte; mean over {config['model_windows']} windows × {heads} heads "
        "(band: ± 1 std)"
    )
    return style.save(fig, stem)
