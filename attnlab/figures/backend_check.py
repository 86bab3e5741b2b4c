"""Figure of the backend_check kind: each backend's error against the dense reference, relative to
its tolerance, per normalizer and dtype (one panel per dtype; bars left of 1 passed)."""

from __future__ import annotations

from pathlib import Path

from attnlab.figures import style
from attnlab.figures.style import plt

PASSED, FAILED = "#4e79a7", "#e15759"
FLOOR = 1e-4  # exact results (error 0) are drawn at this ratio


def ratio(record: dict) -> float:
    """max over output and gradients of error / (tolerance * max(1, |reference|)): <= 1 passes."""
    parts = [
        record[f"max_abs_error_{part}"] / (record["tolerance"] * max(1.0, record[f"max_abs_reference_{part}"]))
        for part in ("out", "grad")
    ]
    return max(FLOOR, *parts)


def render(payload: dict, out_dir: Path) -> list[Path]:
    style.setup()
    records = [r for r in payload["records"] if "skipped" not in r]
    if not records:
        return []
    specs = payload["config"]["normalizers"]
    order = {spec["label"]: i for i, spec in enumerate(specs)}
    dtypes = [d for d in payload["config"]["dtypes"] if any(r["dtype"] == d for r in records)]
    rows = sorted(
        {(r["normalizer"], r["backend"], r["causal"]) for r in records},
        key=lambda row: (order.get(row[0], len(order)), row[1], not row[2]),
    )
    device = records[0].get("device_kind", "?")
    fig, axes = plt.subplots(
        1, len(dtypes), figsize=(4.2 * len(dtypes) + 1.5, 0.28 * len(rows) + 1.4), sharey=True, squeeze=False
    )
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        by_row = {(r["normalizer"], r["backend"], r["causal"]): r for r in records if r["dtype"] == dtype}
        for y, row in enumerate(rows):
            record = by_row.get(row)
            if record is None:
                continue
            if "error" in record:
                ax.text(FLOOR * 1.2, y, "failed to run", color=FAILED, va="center", fontsize=8)
                continue
            value = ratio(record)
            ax.barh(y, value, left=0, color=PASSED if record["passed"] else FAILED, height=0.7)
        ax.axvline(1.0, color="0.3", lw=1, ls="--")
        ax.set_xscale("log")
        ax.set_xlim(FLOOR, 10.0)
        ax.set_title(f"{dtype} (tolerance {by_row[next(iter(by_row))]['tolerance']:g})" if by_row else dtype)
        ax.set_xlabel("error / (tolerance × max(1, |reference|))")
        ax.grid(axis="y", alpha=0)
    labels = [f"{normalizer} · {backend}{'' if causal else ' · full'}" for normalizer, backend, causal in rows]
    axes[0][0].set_yticks(range(len(rows)), labels)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"Each backend against the dense float32 reference, values and gradients ({device})")
    return style.save(fig, out_dir / f"{payload['experiment']}_errors")
