"""Figures from results JSON alone: no model, no recompute.

`render(json_path)` draws the figures of one results file into <results>/figures/;
`render_all(results_dir)` does every file and rewrites the results/README.md index.
"""

from __future__ import annotations

from pathlib import Path

from attnlab.experiments.results import read_json
from attnlab.figures import (
    calibration,
    distillation,
    fading_synthetic,
    length_generalization,
    needle,
    sparsity,
    throughput,
    throughput_experiment,
    training,
)

RENDERERS = {
    "calibration": calibration.render,
    "distillation": distillation.render,
    "fading_synthetic": fading_synthetic.render,
    "length_generalization": length_generalization.render,
    "needle": needle.render,
    "sparsity": sparsity.render,
    "throughput": throughput_experiment.render,
    "throughput_benchmark": throughput.render,
    "train_lm_benchmark": training.render,
}


def render(json_path: str | Path) -> list[Path]:
    """Draw the figures of one results file; returns the paths written (PNG and SVG)."""
    json_path = Path(json_path)
    payload = read_json(json_path)
    kind = payload.get("kind")
    if kind not in RENDERERS:
        raise ValueError(f"{json_path}: kind {kind!r} has no figures; kinds with figures: {', '.join(RENDERERS)}")
    return RENDERERS[kind](payload, json_path.parent / "figures")


def render_all(results_dir: str | Path) -> dict[Path, list[Path]]:
    """Render every results JSON in `results_dir` and rewrite its README.md index."""
    results_dir = Path(results_dir)
    rendered = {}
    for json_path in sorted(results_dir.glob("*.json")):
        if json_path.name.endswith(".previous.json"):
            continue
        payload = read_json(json_path)
        if payload.get("kind") in RENDERERS:
            rendered[json_path] = render(json_path)
    write_index(results_dir, rendered)
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
        name = payload["experiment"]
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
    index = results_dir / "README.md"
    index.write_text("\n".join(lines))
    return index
