"""Figures of a throughput_benchmark results file: time per call and peak memory vs n."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, NullLocator

from attnlab.figures import style

GIB = 1 << 30
MODES = ("forward", "forward+backward")
MEMORY_LINES_GIB = (4, 20)
# Peers in greys, told apart by marker; attnlab normalizers in their registry colours.
PEER_GREYS = ["0.0", "0.45", "0.3", "0.6", "0.15", "0.7"]
PEER_MARKERS = ["s", "D", "^", "v", "<", ">", "P", "X"]


def _line_styles(records: list[dict]) -> dict[str, dict]:
    """case -> matplotlib style and legend label, fixed by the case's library and normalizer."""
    styles, peers = {}, 0
    for r in records:
        case = r["case"]
        if case in styles:
            continue
        if r["library"] == "attnlab":
            dense = r.get("implementation") == "dense"
            styles[case] = {
                "color": style.COLORS.get(r["normalizer"], "#7f7f7f"),
                "marker": "o",
                "ls": ":" if dense else "-",
                "mfc": "none" if dense else None,
                "label": r.get("label") or style.LABELS.get(r["normalizer"], case),
            }
        else:
            styles[case] = {
                "color": PEER_GREYS[peers % len(PEER_GREYS)],
                "marker": PEER_MARKERS[peers % len(PEER_MARKERS)],
                "ls": "--",
                "mfc": "none",
                "label": r.get("label") or case,
            }
            peers += 1
    return styles


def _order(records: list[dict]) -> list[str]:
    """attnlab cases first, then peers, each in the order the records first name them."""
    cases = list(dict.fromkeys(r["case"] for r in records))
    return sorted(cases, key=lambda c: next(r["library"] != "attnlab" for r in records if r["case"] == c))


def _length_axis(ax, ticks: list[int]) -> None:
    """Log-scaled n with the given lengths as plain-number ticks."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:,}" for t in ticks], rotation=30 if len(ticks) > 5 else 0)
    ax.set_xlabel("sequence length n (tokens)")


def _setting_title(payload: dict) -> str:
    s, env = payload.get("config", {}), payload.get("environment", {})
    return (
        f"causal attention, B={s.get('batch')}, {s.get('heads')} heads, head dim {s.get('head_dim')}, "
        f"{s.get('dtype')}; {env.get('backend')} ({env.get('device_kind')}, {env.get('cpu_count')} CPUs)"
    )


def _time_figure(payload: dict, out_dir: Path) -> list[Path]:
    records = [r for r in payload["records"] if r.get("measure") == "time" and r.get("median_s")]
    styles = _line_styles(records)
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0), sharey=True, squeeze=False, layout="constrained")
    for ax, mode in zip(axes[0], MODES, strict=True):
        for case in _order(records):
            rows = sorted((r for r in records if r["case"] == case and r["mode"] == mode), key=lambda r: r["n"])
            if not rows:
                continue
            st = styles[case]
            ax.plot(
                [r["n"] for r in rows],
                [r["median_s"] for r in rows],
                color=st["color"],
                marker=st["marker"],
                ls=st["ls"],
                mfc=st["mfc"],
                ms=4.5,
                lw=1.5,
                label=st["label"],
            )
        _length_axis(ax, sorted({r["n"] for r in records}))
        ax.set_yscale("log")
        ax.set_title(mode)
    axes[0][0].set_ylabel("median time per call (s)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    more = [(h, lab) for h, lab in zip(*axes[0][1].get_legend_handles_labels(), strict=True) if lab not in labels]
    handles, labels = handles + [h for h, _ in more], labels + [lab for _, lab in more]
    fig.legend(handles, labels, loc="outside right center", frameon=False)
    fig.suptitle(_setting_title(payload) + "\nsolid: attnlab (chunked); dashed grey: peers", fontsize=10)
    return style.save(fig, out_dir / f"{payload['experiment']}_time")


def _memory_figure(payload: dict, out_dir: Path) -> list[Path]:
    records = [r for r in payload["records"] if r.get("measure") == "memory" and r.get("peak_bytes")]
    styles = _line_styles(records)
    summary = {row["case"]: row for row in payload.get("memory_summary", [])}
    fig, ax = plt.subplots(figsize=(9.5, 4.2), layout="constrained")
    n_lo, n_hi = min(r["n"] for r in records), max(r["n"] for r in records)
    # Extrapolations are drawn up to 8x the longest measured n; the legend gives where they reach 20 GiB.
    x_end = 8 * n_hi
    y_lo = min(r["peak_bytes"] for r in records) / GIB / 2
    for case in _order(records):
        rows = sorted((r for r in records if r["case"] == case), key=lambda r: r["n"])
        st, row = styles[case], summary.get(case, {})
        label = st["label"]
        if row.get("fit") and row.get("n_at_20GiB_extrapolated"):
            label += f"; 20 GiB at n ≈ {row['n_at_20GiB_extrapolated']:,} (extrapolated)"
        elif row.get("n_at_20GiB_logits"):
            label += f"; logits reach 20 GiB at n = {row['n_at_20GiB_logits']:,}"
        ns, peaks = [r["n"] for r in rows], [r["peak_bytes"] / GIB for r in rows]
        ax.plot(ns, peaks, color=st["color"], marker=st["marker"], ls="none", mfc=st["mfc"], ms=5)
        ax.plot([], [], color=st["color"], marker=st["marker"], mfc=st["mfc"], ls=st["ls"], label=label)
        xs = [n_lo * 2 ** (k / 8) for k in range(int(8 * math.log2(x_end / n_lo)) + 1)]
        if row.get("fit"):
            a, b = row["fit"]["a_bytes"], row["fit"]["b_bytes_per_token"]
            xs = [x for x in xs if x >= ns[0]]
            ax.plot(xs, [(a + b * x) / GIB for x in xs], color=st["color"], lw=1)
        elif row.get("n_at_20GiB_logits"):
            per_n2 = 20 * GIB / row["n_at_20GiB_logits"] ** 2
            xs = [x for x in xs if per_n2 * x * x / GIB >= y_lo]
            ax.plot(xs, [per_n2 * x * x / GIB for x in xs], color=st["color"], lw=1, ls=":")
    for limit in MEMORY_LINES_GIB:
        ax.axhline(limit, color="0.5", lw=0.8, ls="-.")
        ax.annotate(f"{limit} GiB", (0.01, limit), xycoords=("axes fraction", "data"), ha="left", va="bottom")
    ax.plot([], [], color="0.3", lw=1, label="linear fit a + b n (extrapolated)")
    ax.plot([], [], color="0.3", lw=1, ls=":", label="jax.nn logits alone: B·heads·n²·bytes")
    ticks = [2**k for k in range(int(math.log2(n_lo)), int(math.log2(x_end)) + 1)]
    _length_axis(ax, ticks[:: max(1, math.ceil(len(ticks) / 8))])
    ax.set_yscale("log")
    ax.set_ylim(bottom=y_lo)
    metric = records[0].get("peak_metric", "peak RSS of the process")
    ax.set_ylabel(f"peak memory of one forward (GiB)\n{metric}")
    ax.set_title(_setting_title(payload), fontsize=9)
    fig.legend(loc="outside right center", frameon=False)
    return style.save(fig, out_dir / f"{payload['experiment']}_memory")


def render(payload: dict, out_dir: Path) -> list[Path]:
    """Time per call vs n (forward and forward+backward panels) and, if measured, peak memory vs n."""
    style.setup()
    paths = []
    if any(r.get("measure") == "time" and r.get("median_s") for r in payload["records"]):
        paths += _time_figure(payload, out_dir)
    if any(r.get("measure") == "memory" and r.get("peak_bytes") for r in payload["records"]):
        paths += _memory_figure(payload, out_dir)
    return paths
