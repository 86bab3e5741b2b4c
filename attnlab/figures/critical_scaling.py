"""Figures of the critical_scaling results: the self weight against gamma for each n (the transition
sharpening with n), and gamma_half against n, measured (mean and 95% interval over seeds) and predicted."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from attnlab.figures import style

LABELS = {"critical_softmax": "softmax(γ log n · z)", "logn_sparsemax": "sparsemax(γ log n · z)",
          "logn_entmax15": "1.5-entmax(γ log n · z)"}  # fmt: skip


def _summary(payload: dict) -> dict:
    """The results file's summary, or the same computed from its records (an unfinished run)."""
    from attnlab.experiments.critical_scaling import summarize

    return payload["summary"] if "summary" in payload else summarize(None, payload["records"])


def _band(entries: list[dict], metric: str):
    """x (gamma), mean, low, high of a metric over the given summary groups."""
    rows = [(e["gamma"], e[metric]) for e in entries if e.get(metric)]
    gamma = np.array([g for g, _ in rows])
    mean = np.array([v["mean"] for _, v in rows])
    low = np.array([v["low"] if v["low"] is not None else v["mean"] for _, v in rows])
    high = np.array([v["high"] if v["high"] is not None else v["mean"] for _, v in rows])
    return gamma, np.clip(mean, 0, 1), np.clip(low, 0, 1), np.clip(high, 0, 1)


def render(payload: dict, out_dir: Path) -> list[Path]:
    style.setup()
    config, records = payload["config"], payload["records"]
    summary = _summary(payload)
    names, rhos = config["normalizers"], config["rhos"]
    lengths = sorted({r["n"] for r in records})
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, max(1, len(lengths))))
    name = payload["experiment"]
    paths = []

    fig, axes = plt.subplots(len(rhos), len(names), figsize=(4.2 * len(names), 3.4 * len(rhos)), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")  # fmt: skip
    groups = summary["measures"]["groups"]
    for row, rho in enumerate(rhos):
        for col, normalizer in enumerate(names):
            ax = axes[row][col]
            for color, n in zip(colors, lengths, strict=True):
                entries = [g for g in groups if g["normalizer"] == normalizer and g["rho"] == rho and g["n"] == n]
                if not entries:
                    continue
                gamma, mean, low, high = _band(entries, "self_weight")
                ax.plot(gamma, mean, color=color, lw=1.6, label=f"n = {n:,}")
                ax.fill_between(gamma, low, high, color=color, alpha=0.2, lw=0)
                predicted = next((r for r in records if r["normalizer"] == normalizer and r["rho"] == rho
                                  and r["n"] == n), None)  # fmt: skip
                if predicted is not None and predicted["self_weight_theory"][0] is not None:
                    ax.plot(predicted["gammas"], predicted["self_weight_theory"], color=color, lw=1.0, ls="--")
            if normalizer == "critical_softmax":
                ax.axvline(1.0 / (1.0 - rho), color="black", lw=0.9, ls=":", label="γ_c = 1 / (1 − ρ)")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{LABELS.get(normalizer, normalizer)}, ρ = {rho}")
            if row == len(rhos) - 1:
                ax.set_xlabel("γ (the logits are multiplied by γ log n)")
            if col == 0:
                ax.set_ylabel("weight on the token itself")
    axes[0][0].legend(loc="upper left", frameon=False)
    fig.suptitle(
        "Self weight vs γ on almost-simplex tokens (mean and 95% t interval over seeds; dashed: exact simplex)"
    )
    paths += style.save(fig, out_dir / f"{name}_self_weight")

    fig, axes = plt.subplots(1, len(rhos), figsize=(4.6 * len(rhos), 3.6), squeeze=False, layout="constrained")
    halves = summary["gamma_half"]["groups"]
    for col, rho in enumerate(rhos):
        ax = axes[0][col]
        for i, normalizer in enumerate(names):
            entries = [g for g in halves if g["normalizer"] == normalizer and g["rho"] == rho and g.get("gamma_half")]
            if not entries:
                continue
            n = np.array([e["n"] for e in entries])
            mean = np.array([e["gamma_half"]["mean"] for e in entries])
            err = np.array([[e["gamma_half"]["mean"] - (e["gamma_half"]["low"] or e["gamma_half"]["mean"]),
                             (e["gamma_half"]["high"] or e["gamma_half"]["mean"]) - e["gamma_half"]["mean"]]
                            for e in entries]).T  # fmt: skip
            ax.errorbar(n, mean, yerr=err, marker=style.MARKERS[i], ms=4, capsize=2, lw=1.4,
                        color=f"C{i}", label=LABELS.get(normalizer, normalizer))  # fmt: skip
            theory = [(r["n"], r["gamma_half_theory"]) for r in records
                      if r["normalizer"] == normalizer and r["rho"] == rho and r["seed"] == records[0]["seed"]
                      and r["gamma_half_theory"] is not None]  # fmt: skip
            if theory:
                tn, tg = zip(*sorted(theory), strict=True)
                ax.plot(tn, tg, ls="--", lw=1.0, color=f"C{i}")
        ax.axhline(1.0 / (1.0 - rho), color="black", lw=0.9, ls=":", label="γ_c = 1 / (1 − ρ) (softmax, n → ∞)")
        ax.set_xscale("log")
        ax.set_yscale("log", base=2)
        ax.set_xlabel("row length n")
        ax.set_ylabel("γ at which the self weight reaches 1/2")
        ax.set_title(f"ρ = {rho}")
    axes[0][0].legend(loc="center left", bbox_to_anchor=(0.0, 0.7), frameon=False)
    fig.suptitle("Where the transition sits (mean and 95% t interval over seeds; dashed: exact simplex)")
    paths += style.save(fig, out_dir / f"{name}_gamma_half")
    return paths


def findings(payload: dict) -> list:
    """Per normalizer and rho: where the self weight crosses 1/2 at the smallest and largest n (mean
    and interval over seeds), against the theory's gamma_c for softmax (is it inside the interval?)."""
    from attnlab.figures.findings import Finding, interval_text

    summary = _summary(payload)
    groups = summary["gamma_half"]["groups"]
    seeds = max((len(g["seeds"]) for g in groups), default=0)
    figure = f"{payload['experiment']}_gamma_half.png"
    out = []
    for normalizer in payload["config"]["normalizers"]:
        for rho in payload["config"]["rhos"]:
            rows = [g for g in groups if g["normalizer"] == normalizer and g["rho"] == rho and g.get("gamma_half")]
            rows.sort(key=lambda g: g["n"])
            if not rows:
                continue
            first, last = rows[0], rows[-1]
            label = LABELS.get(normalizer, normalizer)
            claim = (
                f"{label}, ρ = {rho}, {seeds} seeds: the self weight reaches 1/2 at γ = "
                f"{interval_text(first['gamma_half'])} for n = {first['n']:,} and {interval_text(last['gamma_half'])} "
                f"for n = {last['n']:,}"
            )
            significant = None
            if normalizer == "critical_softmax":
                critical = 1.0 / (1.0 - rho)
                interval = last["gamma_half"]
                inside = interval["low"] is not None and interval["low"] <= critical <= interval["high"]
                where = "inside" if inside else "outside"
                offset = 100.0 * (interval["mean"] / critical - 1.0)
                claim += (
                    f"; the theory's γ_c = 1 / (1 − ρ) = {critical:g} (the exact simplex as n → ∞) is {where} "
                    f"that interval, which sits {offset:+.1f}% from it"
                )
                significant = None if interval["low"] is None else not inside
            else:
                a, b = first["gamma_half"], last["gamma_half"]
                ratio = b["mean"] / a["mean"]
                claim += f": x{ratio:.2f}, so under γ log n scaling this map goes one-hot at smaller γ as n grows"
                significant = (
                    None if a["low"] is None or b["low"] is None else (a["low"] > b["high"] or b["low"] > a["high"])
                )
            out.append(Finding(claim, significant, figure))
    return out
