"""Figures of a `throughput` results file: tokens/s, time relative to a baseline, the attention
FLOP rate (when recorded), compiled memory, compile time and (when measured) peak memory, each vs n.

One panel per mode (forward, forward+backward) in each figure. attnlab cases take their
normalizer's fixed colour, with the line style naming the implementation (chunked solid, dense
dotted, Pallas dash-dot, cuDNN dashed); the peers (torch SDPA, the entmax library) take the colour
of the normalizer they compute, drawn dash-dot-dot with hollow markers; the jax.nn baseline is
grey, dashed.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from attnlab.figures import style

MIB = 1 << 20
GIB = 1 << 30
JAX_NN = "jax.nn"
LINE_STYLES = {"chunked": "-", "dense": ":", "pallas": "-.", "cudnn": "--"}
PEER_LINE = (0, (5, 1.5, 1, 1.5, 1, 1.5))  # dash-dot-dot
PEER_STYLES = {
    "torch_sdpa": {"marker": "P", "label": "torch SDPA"},
    "entmax_lib": {"marker": "X", "label": "entmax library"},
    "adasplash": {"marker": "*", "label": "AdaSplash"},
}
JAX_NN_STYLES = {
    "xla": {"color": "0.2", "marker": "s", "label": "jax.nn (XLA)"},
    "cudnn": {"color": "0.55", "marker": "D", "label": "jax.nn (cuDNN)"},
}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
KEY = "line styles: attnlab chunked solid, dense dotted, Pallas dash-dot, cuDNN dashed; jax.nn grey dashed; "
KEY += "peers (torch SDPA, entmax library) dash-dot-dot, hollow markers, in their normalizer's colour"


def _measure(record: dict) -> str:
    return record.get("measure", "time")  # results written before memory points carry no measure


def _timed(payload: dict) -> list[dict]:
    return [r for r in payload["records"] if _measure(r) == "time"]


def _cases(payload: dict, records: list[dict]) -> list[tuple[str, str]]:
    """(case, implementation) in config order (per normalizer its implementations, then its
    peers; then jax.nn), then any others the records name."""
    config = payload["config"]
    order = []
    for spec in config["normalizers"]:
        order += [(spec["label"], impl) for impl in config["implementations"]]
        order += [(spec["label"], peer) for peer in config.get("peers", [])]
    order += [(JAX_NN, impl) for impl in config.get("jax_nn", [])]
    seen = list(dict.fromkeys((r["case"], r["implementation"]) for r in records))
    return [c for c in order if c in seen] + [c for c in seen if c not in order]


def _line_style(payload: dict, case: str, implementation: str) -> dict:
    specs = payload["config"]["normalizers"]
    if case == JAX_NN:
        base = JAX_NN_STYLES.get(implementation, {"color": "0.4", "marker": "v", "label": f"jax.nn ({implementation})"})
        return {**base, "ls": "--", "mfc": "none", "lw": 1.5}
    colors = style.colors_for(specs)
    index = next((i for i, s in enumerate(specs) if s["label"] == case), 0)
    spec = specs[index] if specs else {"name": case, "label": case}
    color = colors.get(case, "#7f7f7f")
    if implementation in PEER_STYLES:
        peer = PEER_STYLES[implementation]
        label = f"{style.display_label(spec)} · {peer['label']}"
        return {"color": color, "marker": peer["marker"], "ls": PEER_LINE, "mfc": "none", "lw": 1.3, "label": label}
    return {
        "color": color,
        "marker": style.MARKERS[index % len(style.MARKERS)],
        "ls": LINE_STYLES.get(implementation, "-"),
        "mfc": None if implementation == "chunked" else "none",
        "lw": 1.5,
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


def _minor_label(ax, value: float, _position=None) -> str:
    """Minor ticks of a log axis: all labelled within about a decade, 2 and 5 within three."""
    low, high = ax.get_ylim()
    if value <= 0 or low <= 0:
        return ""
    span = high / low
    mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9))
    return _plain(value) if span < 12 or (span < 1000 and mantissa in (2, 5)) else ""


def _length_axis(ax, lengths: list[int]) -> None:
    """Log2-scaled n with the given lengths (at most about 8 of them) as plain-number ticks."""
    ticks = lengths[:: max(1, math.ceil(len(lengths) / 8))]
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{n:,}" for n in ticks], rotation=30 if len(ticks) > 5 else 0)
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


def _not_run(payload: dict, records: list[dict], key: str) -> list[str]:
    """One line per reason: the (case, implementation) pairs with no value of `key` at any n, and
    the pairs that have some but stop early (e.g. a peer beyond peer_max_n), with why."""
    by_reason: dict[str, list[str]] = {}
    for case, implementation in _cases(payload, records):
        rows = [r for r in records if (r["case"], r["implementation"]) == (case, implementation)]
        missing = [r for r in rows if r.get(key) is None]
        if not missing:
            continue
        why = missing[0].get("skipped") or missing[0].get("error")
        if why is None:
            why = "run eagerly, nothing compiled" if implementation in PEER_STYLES else f"no {key} recorded"
        name = f"{case} · {implementation}"
        if len(missing) < len(rows):
            name += f" (n ≥ {min(r['n'] for r in missing):,})"
        by_reason.setdefault(why, []).append(name)
    return [f"not run: {', '.join(names)}: {why}" for why, names in by_reason.items()]


def _legend(fig, axes) -> None:
    handles, labels = {}, []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    fig.legend([handles[label] for label in labels], labels, loc="outside right center", frameon=False)


def _footer(fig, lines: list[str]) -> None:
    fig.text(0.0, -0.01, "\n".join(lines[:8]), ha="left", va="top", fontsize=7.5, color="0.35")


def _panels(
    payload: dict,
    records: list[dict],
    modes: list[str],
    value,
    ylabel: str,
    what: str,
    *,
    key: str,
    guide=None,
    extra=None,
    notes: list[str] | None = None,
):
    """A figure with one log-log panel per mode plotting value(record) vs n for every case whose
    records have `key`; guide(ax, lengths) and extra(ax, mode) add lines; the footer gives the
    line styles, `notes` (read after the panels are drawn) and the cases not run."""
    present = [r for r in records if r.get(key) is not None]
    lengths = sorted({r["n"] for r in present})
    fig, axes = plt.subplots(
        1, len(modes), figsize=(4.9 * len(modes) + 2.9, 4.4), sharey=True, squeeze=False, layout="constrained"
    )
    for ax, mode in zip(axes[0], modes, strict=True):
        for case, implementation in _cases(payload, present):
            rows = sorted(
                (r for r in present if (r["case"], r["implementation"], r["mode"]) == (case, implementation, mode)),
                key=lambda r: r["n"],
            )
            if not rows:
                continue
            st = _line_style(payload, case, implementation)
            ax.plot(
                [r["n"] for r in rows],
                [value(r) for r in rows],
                color=st["color"],
                marker=st["marker"],
                ls=st["ls"],
                mfc=st["mfc"],
                ms=4.5,
                lw=st["lw"],
                label=st["label"],
            )
        if extra is not None:
            extra(ax, mode)
        if guide is not None and lengths:
            guide(ax, lengths)
        if lengths:
            _length_axis(ax, lengths)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_plain))
        ax.yaxis.set_minor_formatter(FuncFormatter(functools.partial(_minor_label, ax)))
        ax.set_title(mode)
    axes[0][0].set_ylabel(ylabel)
    _legend(fig, axes[0])
    fig.suptitle(_title(payload, what), fontsize=10)
    _footer(fig, [KEY, *(notes or []), *_not_run(payload, records, key)])
    return fig


def _logits_guide(payload: dict, scale: float):
    """Draws one [B, heads, n, n] logits tensor in config.dtype, in units of `scale` bytes."""
    config = payload["config"]
    per_n2 = config["batch"] * config["heads"] * ITEMSIZE.get(config["dtype"], 4)

    def draw(ax, lengths):
        ax.plot(
            lengths,
            [per_n2 * n * n / scale for n in lengths],
            color="0.6",
            lw=1.0,
            ls=(0, (1, 3)),
            label="one n×n logits tensor (B·heads·n²·bytes)",
        )

    return draw


def baseline(payload: dict, records: list[dict]) -> tuple[str, str] | None:
    """The case the relative-time figure divides by: the first normalizer's chunked case (softmax
    in the shipped configs), else the first attnlab case timed."""
    timed = [(c, i) for c, i in _cases(payload, records) if c != JAX_NN and i not in PEER_STYLES]
    chunked = [(c, i) for c, i in timed if i == "chunked"]
    return (chunked or timed or [None])[0]


def _relative_time(payload: dict, records: list[dict], modes: list[str]):
    """median time ÷ the baseline's median time at the same n and mode (the same run), per case."""
    base = baseline(payload, records)
    if base is None:
        return None
    times = {(r["n"], r["mode"]): r["median_seconds"] for r in records if (r["case"], r["implementation"]) == base}
    rows = [
        {**r, "relative": r["median_seconds"] / times[r["n"], r["mode"]]}
        for r in records
        if (r["n"], r["mode"]) in times
    ]

    def unity(ax, _mode):
        ax.axhline(1.0, color="0.5", lw=0.8)

    label = _line_style(payload, *base)["label"]
    return _panels(
        payload,
        rows,
        modes,
        lambda r: r["relative"],
        f"median time ÷ median time of {label}",
        f"Time per call relative to {label}, measured in the same run (lower is faster)",
        key="relative",
        extra=unity,
    )


def _flop_rate(payload: dict, records: list[dict], modes: list[str]):
    """The records' attention FLOP rate (tflops_per_second: the same matmul count for every case,
    over its median time) vs n, in GFLOP/s when every rate is below 1 TFLOP/s (a CPU)."""
    rates = [r["tflops_per_second"] for r in records if r.get("tflops_per_second")]
    giga = max(rates) < 1.0
    unit = "GFLOP/s" if giga else "TFLOP/s"
    return _panels(
        payload,
        records,
        modes,
        lambda r: r["tflops_per_second"] * (1e3 if giga else 1.0),
        f"attention {unit} (matmul work ÷ median time)",
        "Attention FLOP rate (higher is better)",
        key="tflops_per_second",
        notes=[
            "work counted as FlashAttention's benchmarks count it: 4·batch·heads·n²·head_dim per forward, "
            "halved when causal, 3.5x for forward+backward; the same count for every case"
        ],
    )


def _fit(rows: list[dict]) -> tuple[float, float] | None:
    """(a, b) of peak = a + b n by least squares through the measured points (2 lengths or more)."""
    if len({r["n"] for r in rows}) < 2:
        return None
    slope, intercept = np.polyfit([r["n"] for r in rows], [r["peak_bytes"] for r in rows], 1)
    return float(intercept), float(slope)


def _peak_memory(payload: dict, records: list[dict]):
    """Peak memory of one call vs n, per memory mode, with a + b n fits for the linear paths."""
    config = payload["config"]
    modes = config.get("memory_modes", ["forward"])
    measured = [r for r in records if r.get("peak_bytes") is not None]
    metric = measured[0].get("peak_metric", "peak RSS of the process")
    notes: list[str] = []

    def fits(ax, mode):
        longest = max(r["n"] for r in measured)
        for case, implementation in _cases(payload, measured):
            if implementation == "dense" or (case == JAX_NN and implementation == "xla"):
                continue  # quadratic: no line fits it
            rows = [r for r in measured if (r["case"], r["implementation"], r["mode"]) == (case, implementation, mode)]
            fit = _fit(rows)
            if fit is None or fit[1] <= 0:
                continue
            a, b = fit
            xs = np.geomspace(min(r["n"] for r in rows), 4 * longest, 24)
            ax.plot(
                xs, (a + b * xs) / GIB, color=_line_style(payload, case, implementation)["color"], lw=0.8, alpha=0.6
            )
            notes.append(
                f"{mode}, {case} · {implementation}: peak ≈ {a / GIB:.2f} GiB + {b / 1024:.1f} KiB × n "
                f"(extrapolated: 20 GiB at n ≈ {max(0.0, (20 * GIB - a) / b):,.0f})"
            )

    fig = _panels(
        payload,
        measured,
        modes,
        lambda r: r["peak_bytes"] / GIB,
        f"peak memory of one call (GiB)\n{metric}",
        "Peak memory of one call, each point in a fresh process (thin lines: a + b·n fits, extended 4x)",
        key="peak_bytes",
        guide=_logits_guide(payload, GIB),
        extra=fits,
        notes=notes,
    )
    return fig


def render(payload: dict, out_dir: Path) -> list[Path]:
    """tokens/s, time relative to the baseline, the FLOP rate, compiled temporary memory and compile time vs n
    (one panel per mode in each), and peak memory vs n when memory points were measured."""
    style.setup()
    name = payload["experiment"]
    paths = []
    timed = _timed(payload)
    memory = [r for r in payload["records"] if _measure(r) == "memory"]
    modes = payload["config"]["modes"]
    if any(r.get("median_seconds") for r in timed):
        fig = _panels(
            payload,
            timed,
            modes,
            lambda r: r["tokens_per_second"],
            "tokens per second (batch·n / median time)",
            "Attention throughput (higher is better)",
            key="median_seconds",
        )
        paths += style.save(fig, out_dir / f"{name}_tokens_per_second")
        if any(r.get("tflops_per_second") for r in timed):
            paths += style.save(_flop_rate(payload, timed, modes), out_dir / f"{name}_flop_rate")
        fig = _relative_time(payload, [r for r in timed if r.get("median_seconds")], modes)
        if fig is not None:
            paths += style.save(fig, out_dir / f"{name}_relative_time")
        fig = _panels(
            payload,
            timed,
            modes,
            lambda r: r["compiled_temp_bytes"] / MIB,
            "compiled temporary buffers (MiB)",
            "Memory the compiled program allocates beyond its inputs and outputs (XLA buffer assignment)",
            key="compiled_temp_bytes",
            guide=_logits_guide(payload, MIB),
        )
        paths += style.save(fig, out_dir / f"{name}_compiled_memory")
        fig = _panels(
            payload,
            timed,
            modes,
            lambda r: r["compile_seconds"],
            "compile time (s): trace + lower + compile",
            "Compile time",
            key="compile_seconds",
        )
        for ax in fig.axes:
            if ax.get_yscale() == "log":
                low, high = ax.get_ylim()
                if high / max(low, 1e-9) < 30:
                    ax.set_yscale("linear")
                    ax.set_ylim(bottom=0)
        paths += style.save(fig, out_dir / f"{name}_compile_time")
    if any(r.get("peak_bytes") for r in memory):
        paths += style.save(_peak_memory(payload, memory), out_dir / f"{name}_peak_memory")
    return paths
