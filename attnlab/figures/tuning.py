"""The learning-rate tuning of a results file that has one (`attnlab.experiments.lm.TuningSetting`):
each group's validation loss against the rate, the chosen rate filled, a diverged rate marked at
the top. Drawn by `attnlab.figures.render` for every kind whose records hold tuning records."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from attnlab.experiments import lm
from attnlab.figures import style

LOG_SPAN = 20  # a panel whose finite losses span more than this factor gets a log loss axis


def has_tuning(payload: dict) -> bool:
    return any(r.get("record") == "tuning" for r in payload["records"])


def _label_key(by: tuple[str, ...]) -> str:
    """The group field that names a line (the normalizer, or calibration's output)."""
    return next((k for k in ("normalizer", "output") if k in by), by[0])


def _specs(payload: dict, entries: list[dict], label_key: str) -> list[dict]:
    """The config's normalizer specs, or one per tuned label where the config lists none."""
    return payload.get("config", {}).get("normalizers") or [
        {"name": e[label_key], "label": e[label_key]} for e in entries
    ]


def render(payload: dict, out_dir: Path) -> list[Path]:
    """<experiment>_tuning.png/svg: one panel per value of the groups' fields other than the
    normalizer (e.g. per width), one line per normalizer."""
    style.setup()
    records = payload["records"]
    by = lm.tuning_groups(records)
    entries = lm.tuning_summary(records, by)
    label_key = _label_key(by)
    panel_keys = [k for k in by if k != label_key]
    panels = list(dict.fromkeys(tuple(e[k] for k in panel_keys) for e in entries))
    specs = _specs(payload, entries, label_key)
    colors = style.colors_for(list(specs))
    labels = {spec["label"]: style.display_label(spec) for spec in specs}
    tuned = [r for r in records if r.get("record") == "tuning"]
    seeds = sorted({r["tuning_seed"] for r in tuned})
    steps = sorted({r["steps"] for r in tuned})

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False, layout="constrained")
    for ax, panel in zip(axes[0], panels, strict=True):
        chosen_here = [e for e in entries if tuple(e[k] for k in panel_keys) == panel]
        finite = [v for e in chosen_here for v in e["validation_loss"] if v is not None]
        top = max(finite) if finite else 1.0
        for i, entry in enumerate(chosen_here):
            label = entry[label_key]
            color = colors.get(label, "#7f7f7f")
            rates = np.array(entry["learning_rates"])
            losses = np.array([np.nan if v is None else v for v in entry["validation_loss"]])
            marker = style.MARKERS[i % len(style.MARKERS)]
            ax.plot(rates, losses, color=color, marker=marker, mfc="white", lw=1.4, label=labels.get(label, label))
            if entry["chosen"] is not None:
                best = entry["validation_loss"][entry["learning_rates"].index(entry["chosen"])]
                ax.plot([entry["chosen"]], [best], color=color, marker=marker, ms=9, ls="none")
            diverged = rates[np.isnan(losses)]
            if diverged.size:
                ax.plot(diverged, np.full(diverged.size, top), color=color, marker="x", ms=9, ls="none")
        ax.set_xscale("log")
        if finite and min(finite) > 0 and max(finite) / min(finite) > LOG_SPAN:
            ax.set_yscale("log")  # losses over decades: a linear axis flattens all but the worst rate
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("validation loss after training (nats)")
        if panel_keys:
            ax.set_title(", ".join(f"{k} = {v}" for k, v in zip(panel_keys, panel, strict=True)))
    axes[0][0].legend(frameon=False)
    fig.suptitle(
        f"Learning-rate tuning (seed {', '.join(map(str, seeds))}, {', '.join(map(str, steps))} steps): "
        "filled, the rate each one's main models train at; x, not finite"
    )
    return style.save(fig, out_dir / f"{payload['experiment']}_tuning")


def _rate(rate: float) -> str:
    return f"{rate:g}"


def _edge_text(entry: dict) -> str:
    """For a rate chosen at the grid's edge: how far its loss is below its neighbour's, which says
    whether the grid stopped on a slope or on a plateau."""
    if not entry["at_edge"]:
        return ""
    rates, losses = entry["learning_rates"], entry["validation_loss"]
    at = rates.index(entry["chosen"])
    inner = at - 1 if at == len(rates) - 1 else at + 1
    if losses[inner] is None:
        return f" (the grid's edge; {_rate(rates[inner])} not finite)"
    return f" (the grid's edge; loss {losses[at]:.2g} against {losses[inner]:.2g} at {_rate(rates[inner])})"


def finding_text(payload: dict) -> str | None:
    """One sentence: the rate tuning chose for each group (None: the file has no tuning)."""
    if not has_tuning(payload):
        return None
    records = payload["records"]
    entries = lm.tuning_summary(records, lm.tuning_groups(records))
    tuned = [r for r in records if r.get("record") == "tuning"]
    seeds = ", ".join(map(str, sorted({r["tuning_seed"] for r in tuned})))
    steps = ", ".join(f"{s:,}" for s in sorted({r["steps"] for r in tuned}))
    grid = ", ".join(_rate(r) for r in sorted({r["learning_rate"] for r in tuned}))
    groups = lm.tuning_groups(records)
    label_key = _label_key(groups)
    labels = {spec["label"]: style.display_label(spec) for spec in _specs(payload, entries, label_key)}
    chosen = []
    for entry in entries:
        name = ", ".join(str(labels.get(entry[k], entry[k]) if k == label_key else entry[k]) for k in groups)
        if entry["chosen"] is None:
            chosen.append(f"{name}: none (no rate gave a finite loss)")
        else:
            chosen.append(f"{name} {_rate(entry['chosen'])}{_edge_text(entry)}")
    caveat = "; a rate at the grid's edge may not be the best one" if any(e["at_edge"] for e in entries) else ""
    return (
        f"Learning rates chosen by tuning (seed {seeds}, {steps} steps, the lowest held-out loss among {grid}), "
        f"at which every main model below trained: {'; '.join(chosen)}{caveat}"
    )
