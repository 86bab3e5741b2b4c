"""One look for every figure: a fixed colour per normalizer, readable sizes, stable files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from attnlab.atomic import write_atomic

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# One colour per registry name, the same in every figure (colour-blind-safe Tableau 10 order).
COLORS = {
    "softmax": "#4e79a7",
    "scaled_softmax": "#76b7b2",
    "ssmax": "#e15759",
    "sparsemax": "#59a14f",
    "entmax15": "#f28e2b",
    "entmax": "#b07aa1",
    "logn_sparsemax": "#9c755f",
    "logn_entmax15": "#edc948",
    "logn_entmax": "#ff9da7",
    "softmax1": "#17becf",
    "sigmoid": "#bcbd22",
    "stablemax": "#000000",
    "softpick": "#c51b7d",
    "multimax": "#542788",
}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h", "*"]
_EXTRA = ["#bab0ac", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5", "#c49c94"]

LABELS = {
    "softmax": "softmax",
    "scaled_softmax": "scaled softmax",
    "ssmax": "SSMax",
    "sparsemax": "sparsemax",
    "entmax15": "1.5-entmax",
    "entmax": "α-entmax",
    "logn_sparsemax": "log-n sparsemax",
    "logn_entmax15": "log-n 1.5-entmax",
    "logn_entmax": "log-n α-entmax",
    "softmax1": "softmax1 (off-by-one)",
    "sigmoid": "sigmoid (b = -log n)",
    "stablemax": "StableMax",
    "softpick": "softpick",
    "multimax": "MultiMax",
}


def colors_for(specs: list[dict]) -> dict[str, str]:
    """label -> colour: a name's first entry gets the registry colour, repeats get extras in order."""
    out, seen, extra = {}, set(), iter(_EXTRA * 4)
    for spec in specs:
        if spec["name"] in COLORS and spec["name"] not in seen:
            out[spec["label"]] = COLORS[spec["name"]]
        else:
            out[spec["label"]] = next(extra)
        seen.add(spec["name"])
    return out


def display_label(spec: dict) -> str:
    """What the legend shows: the registry's pretty name unless the config gave its own label."""
    return LABELS.get(spec["label"], spec["label"])


def setup() -> None:
    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 150,
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 8.5,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "svg.hashsalt": "attnlab",
            "svg.fonttype": "none",
        }
    )


def save(fig: plt.Figure, stem: Path) -> list[Path]:
    """Write stem.png and stem.svg with no timestamps, so the same JSON gives the same files.
    Each is written atomically (a killed run or a full disk leaves the previous file, never a
    truncated one); `stem` must not climb out of its folder."""
    stem = Path(stem)
    if ".." in stem.parts:
        raise ValueError(f"figure path {str(stem)!r} climbs out of its folder (a '..' part)")
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    metadata = {".png": {"Software": None}, ".svg": {"Date": None, "Creator": None}}
    try:
        for path in paths:
            write_atomic(
                path,
                lambda handle, path=path: fig.savefig(
                    handle, format=path.suffix[1:], metadata=metadata[path.suffix], bbox_inches="tight"
                ),
                binary=True,
            )
    finally:
        plt.close(fig)
    return paths
