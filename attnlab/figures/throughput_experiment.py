"""Figures of a `throughput` experiment: tokens/s, compiled memory and compile time vs n.

One panel per mode (forward, forward+backward) in each figure. attnlab cases take their
normalizer's fixed colour, with the line style naming the implementation (chunked solid, dense
dotted, Pallas dash-dot, cuDNN dashed); the jax.nn baseline is drawn in grey, dashed.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from attnlab.figures import style

MIB = 1 << 20
JAX_NN = "jax.nn"
LINE_STYLES = {"chunked": "-", "dense": ":", "pallas": "-.", "cudnn": "--"}
JAX_NN_STYLES = {
    "xla": {"color": "0.2", "marker": "s", "label": "jax.nn (XLA)"},
    "cudnn": {"color": "0.55", "marker": "D", "label": "jax.nn (cuDNN)"},
}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def _cases(payload: dict) -> list[tuple[str, str]]:
    """(case, implementation) in config order, then any others the records name."""
    config = payload["config"]
    order = [(spec["label"], impl) for spec in config["normalizers"] for impl in config["implementations"]]
    order += [(JAX_NN, impl) for impl in config.get("jax_nn", [])]
    seen = list(dict.fromkeys((r["case"], r["implementation"]) for r in payload["records"]))
    return [c for c in order if c in seen] + [c for c in seen if c not in order]


def _line_style(payload: dict, case: str, implementation: str) -> dict:
    specs = payload["config"]["normalizers"]
    if case == JAX_NN:
        base = JAX_NN_STYLES.get(implementation, {"color": "0.4", "marker": "v", "label": f"jax.nn ({implementation})"})
        return {**base, "ls": "--", "mfc": "none"}
    colors = style.colors_for(specs)
    index = next((i for i, s in enumerate(specs) if s["label"] == case), 0)
    spec = specs[index] if specs else {"name": case, "label": case}
    return {
        "color": colors.get(case, "#7f7f7f"),
        "marker": style.MARKERS[index % len(style.MARKERS)],
        "ls": LINE_STYLES.get(implementation, "-"),
        "mfc": None if implementation == "chunked" else "none",
        "label": f"{style.display_label(spec)} · {implementation}",
    }


def _plain(value: float, _position=None) -> str:
    """Tick labels without powers of ten: 0.25, 3, 40, 1.5k, 200k, 1.2M."""
    if value <= 0:
        return ""
    for unit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= unit:
            return f"{value / unit:.3g}{suffix}"
    return f"{value:.3g}"


def _length_axis(ax, lengths: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(lengths))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{n:,}" for n in lengths], rotation=30 if len(lengths) > 5 else 0)
    ax.set_xlabel("sequence length n (tokens)")


def _title(payload: dict, what: str) -> str:
    config, env = payload["config"], payload.get("environment", {})
    devices = sorted({(r.get("backend"), r.get("device_kind")) for r in payload["records"] if r.get("backend")})
    if not devices:
        devices = [(env.get("backend"), env.get("device_kind"))]
    where = "; ".join(f"{backend} ({kind})" for backend, kind in devices)
    if env.get("cpu_count"):
        where += f", {env['cpu_count']} CPUs"
    mask = "causal" if config.get("causal", True) else "bidirectional"
    return (
        f"{what}\n{mask} self-attention, batch {config['batch']}, {config['heads']} heads, head dim "
        f"{config['head_dim']}, {config['dtype']}; {where}"
    )


def _not_run(payload: dict) -> list[str]:
    """One line per reason: the (case, implementation) pairs that ran at no n because of it."""
    by_reason: dict[str, list[str]] = {}
    for case, implementation in _cases(payload):
        rows = [r for r in payload["records"] if (r["case"], r["implementation"]) == (case, implementation)]
        if rows and not any(r.get("median_seconds") for r in rows):
            why = rows[0].get("skipped") or rows[0].get("error") or "?"
            by_reason.setdefault(why, []).append(f"{case} · {implementation}")
    return [f"not run: {', '.join(names)}: {why}" for why, names in by_reason.items()]


def _panels(payload: dict, key: str, ylabel: str, what: str, *, scale: float = 1.0, guide=None):
    """A figure with one log-log panel per mode plotting records[key] / scale vs n."""
    config = payload["config"]
    modes = config["modes"]
    records = [r for r in payload["records"] if r.get(key) is not None]
    lengths = sorted({r["n"] for r in records})
    fig, axes = plt.subplots(
        1, len(modes), figsize=(4.9 * len(modes) + 2.6, 4.3), sharey=True, squeeze=False, layout="constrained"
    )
    for ax, mode in zip(axes[0], modes, strict=True):
        for case, implementation in _cases(payload):
            rows = sorted(
                (r for r in records if (r["case"], r["implementation"], r["mode"]) == (case, implementation, mode)),
                key=lambda r: r["n"],
            )
            if not rows:
                continue
            st = _line_style(payload, case, implementation)
            ax.plot(
                [r["n"] for r in rows],
                [r[key] / scale for r in rows],
                color=st["color"],
                marker=st["marker"],
                ls=st["ls"],
                mfc=st["mfc"],
                ms=4.5,
                lw=1.5,
                label=st["label"],
            )
        if guide is not None and lengths:
            guide(ax, lengths)
        if lengths:
            _length_axis(ax, lengths)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_plain))
        ax.yaxis.set_minor_formatter(FuncFormatter(functools.partial(_minor_label, ax)))
        ax.set_title(mode)
    axes[0][0].set_ylabel(ylabel)
    handles, labels = {}, []
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    fig.legend([handles[label] for label in labels], labels, loc="outside right center", frameon=False)
    fig.suptitle(_title(payload, what), fontsize=10)
    notes = _not_run(payload)
    if notes:
        fig.text(0.0, -0.01, "\n".join(notes[:6]), ha="left", va="top", fontsize=7.5, color="0.35")
    return fig


def _minor_label(ax, value: float, _position=None) -> str:
    """Minor ticks of a log axis: all labelled within about a decade, 2 and 5 within three."""
    low, high = ax.get_ylim()
    if value <= 0 or low <= 0:
        return ""
    span = high / low
    mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9))
    return _plain(value) if span < 12 or (span < 1000 and mantissa in (2, 5)) else ""


def _logits_guide(payload: dict):
    config = payload["config"]
    per_n2 = config["batch"] * config["heads"] * ITEMSIZE.get(config["dtype"], 4)

    def draw(ax, lengths):
        ax.plot(
            lengths,
            [per_n2 * n * n / MIB for n in lengths],
            color="0.6",
            lw=1.0,
            ls=(0, (1, 3)),
            label="one n×n logits tensor (B·heads·n²·bytes)",
        )

    return draw


def render(payload: dict, out_dir: Path) -> list[Path]:
    """tokens/s, compiled temporary memory and compile time vs n; one panel per mode in each."""
    style.setup()
    name = payload["experiment"]
    paths = []
    if not any(r.get("median_seconds") for r in payload["records"]):
        return paths
    fig = _panels(
        payload,
        "tokens_per_second",
        "tokens per second (batch·n / median time)",
        "Attention throughput (higher is better)",
    )
    paths += style.save(fig, out_dir / f"{name}_tokens_per_second")
    fig = _panels(
        payload,
        "compiled_temp_bytes",
        "compiled temporary buffers (MiB)",
        "Memory the compiled program allocates beyond its inputs and outputs (XLA buffer assignment)",
        scale=MIB,
        guide=_logits_guide(payload),
    )
    paths += style.save(fig, out_dir / f"{name}_memory")
    fig = _panels(payload, "compile_seconds", "compile time (s): trace + lower + compile", "Compile time")
    for ax in fig.axes:
        if ax.get_yscale() == "log":
            low, high = ax.get_ylim()
            if high / max(low, 1e-9) < 30:
                ax.set_yscale("linear")
                ax.set_ylim(bottom=0)
    paths += style.save(fig, out_dir / f"{name}_compile_time")
    return paths
