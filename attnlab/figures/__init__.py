"""Figures from results JSON alone: no model, no recompute.

`render(json_path)` draws the figures of one results file into <results>/figures/ (with the
learning-rate tuning figure, attnlab.figures.tuning, where its records hold a tuning);
`render_all(results_dir)` does every file and rewrites the results/README.md index and the
findings page, results/FINDINGS.md (attnlab.figures.findings).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from attnlab.atomic import write_atomic
from attnlab.experiments.results import ResultsError, read_json
from attnlab.figures import tuning
from attnlab.figures.findings import write_findings
from attnlab.figures.names import figure_name
from attnlab.progress import item_bar

FIGURES = "figures"


def renderers() -> dict[str, Any]:
    """kind -> its figure module's render(payload, out_dir), from the one registry of kinds."""
    from attnlab.experiments.kinds import KINDS

    return {name: importlib.import_module(kind.figures).render for name, kind in KINDS.items() if kind.figures}


def render(json_path: str | Path) -> list[Path]:
    """Draw the figures of one results file into <its folder>/figures/; returns the paths written
    (PNG and SVG, each written atomically)."""
    json_path = Path(json_path)
    return _render(json_path, read_json(json_path), renderers())


def _render(json_path: Path, payload: dict[str, Any], drawers: dict[str, Any]) -> list[Path]:
    kind = payload.get("kind")
    if not isinstance(kind, str) or kind not in drawers:
        raise ValueError(f"{json_path}: kind {kind!r} has no figures; kinds with figures: {', '.join(drawers)}")
    if not isinstance(payload.get("records"), list) or not isinstance(payload.get("config"), dict):
        raise ResultsError(f"{json_path}: not a results file (it needs a config object and a records list)")
    out_dir = json_path.parent / FIGURES
    named = {**payload, "experiment": figure_name(json_path)}
    paths = drawers[kind](named, out_dir)
    return paths + tuning.render(named, out_dir) if tuning.has_tuning(named) else paths


def render_all(results_dir: str | Path, *, progress: bool = False) -> dict[Path, list[Path]]:
    """Render every results JSON of a known kind in `results_dir` (archived versions are not
    redrawn) and rewrite its README.md index; `progress` shows a bar over the files (a folder of
    full results takes a minute or two)."""
    results_dir = Path(results_dir)
    drawers = renderers()
    rendered = {}
    json_paths = sorted(results_dir.glob("*.json"))
    with item_bar(progress) as bar:
        task = bar.add_task("figures", total=len(json_paths), item="")
        for json_path in json_paths:
            bar.update(task, item=json_path.name)
            payload = read_json(json_path)
            if payload.get("kind") in drawers:
                rendered[json_path] = _render(json_path, payload, drawers)
            bar.advance(task)
        bar.update(task, item="")
    write_index(results_dir, rendered)
    write_findings(results_dir)
    return rendered


def _training_time(records: list[dict]) -> str:
    """For kinds that train models: their summed training time, which a run resumed from
    checkpoints (or re-evaluated) does not count in run_seconds."""
    seconds = [r["train_seconds"] for r in records if r.get("record") == "training" and "train_seconds" in r]
    return f" (the last run's); models trained in {sum(seconds):.0f} s in all" if seconds else ""


def write_index(results_dir: Path, rendered: dict[Path, list[Path]]) -> Path:
    lines = [
        "# Results",
        "",
        "Every figure here is drawn from the JSON beside it by `attnlab figures results/`.",
        "Each section names the config and the command that produced the JSON.",
        "",
    ]
    for json_path, figures in rendered.items():
        payload = read_json(json_path)
        env = payload.get("environment", {})
        name = figure_name(json_path)
        lines += [
            f"## {name}",
            "",
            f"- kind: `{payload['kind']}`; records: {len(payload['records'])}; "
            f"run time: {payload.get('run_seconds', '?')} s{_training_time(payload['records'])}",
            f"- produced by: `{payload.get('command', 'attnlab run')}` (the config as run is in `{json_path.name}`)",
            f"- environment: jax {env.get('jax')}, backend {env.get('backend')} ({env.get('device_kind')}), "
            f"{env.get('cpu_count')} CPUs, commit {env.get('commit')}",
            "",
        ]
        for fig in figures:
            if fig.suffix == ".png":
                lines += [f"![{fig.stem}](figures/{fig.name})", ""]
    return write_atomic(results_dir / "README.md", lambda handle: handle.write("\n".join(lines)))
