"""Load experiment configs, check them all, and run their sweeps with a progress bar."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from attnlab.experiments.config import ConfigError, apply_overrides, parse_dataclass, read_toml
from attnlab.experiments.results import ResultsFile

NAME_KEYS = ("kind", "name")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A checked config: which kind, the results name, and the kind's Config."""

    kind: str
    name: str
    config: Any
    source: str
    command: str = ""

    @property
    def module(self) -> ModuleType:
        from attnlab.experiments import KINDS

        return KINDS[self.kind]


def from_table(table: dict[str, Any], source: str, default_name: str) -> Experiment:
    """Check a TOML table and build its Experiment, or raise ConfigError with every problem."""
    from attnlab.experiments import KINDS

    problems: list[str] = []
    kind = table.get("kind")
    name = table.get("name", default_name)
    if kind not in KINDS:
        problems.append(f"{source}: kind = {kind!r} is not an experiment kind; available: {', '.join(KINDS)}")
    if not isinstance(name, str) or not name or any(c in name for c in "/\\") or name.startswith("."):
        problems.append(f"{source}: name = {name!r} must be a plain file name (no slashes)")
    if problems:
        raise ConfigError(problems)
    body = {k: v for k, v in table.items() if k not in NAME_KEYS}
    config = parse_dataclass(KINDS[kind].Config, body, source, problems)
    if problems:
        raise ConfigError(problems)
    return Experiment(kind, name, config, source)


def load(path: str | Path, overrides: list[str] = ()) -> Experiment:
    """Read and check one TOML config (with `key=value` overrides)."""
    path = Path(path)
    table = apply_overrides(read_toml(path), list(overrides), str(path))
    experiment = from_table(table, str(path), path.stem)
    command = " ".join(["attnlab run", str(path), *(f"--set {o}" for o in overrides)])
    return dataclasses.replace(experiment, command=command)


def load_all(paths: list[str | Path], overrides: list[str] = ()) -> list[Experiment]:
    """Check every config before any work; one ConfigError lists the problems of all files."""
    experiments, problems = [], []
    for path in paths:
        try:
            experiments.append(load(path, overrides))
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    return experiments


def _point_keywords(run_point: Any, update: Any, workdir: Path) -> dict[str, Any]:
    """The optional keywords a kind's run_point takes: `progress(description, completed, total)`
    to show work inside a long point, and `workdir`, a folder for its checkpoints."""
    accepted = inspect.signature(run_point).parameters
    offered = {"progress": update, "workdir": workdir}
    return {name: value for name, value in offered.items() if name in accepted}


def run(experiment: Experiment, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Run every sweep point not already in out_dir/<name>.json; returns that path.

    The file is rewritten atomically after each point, so Ctrl-C loses only the point in flight
    and a rerun resumes where it stopped. Kinds that train models checkpoint inside a point
    (under out_dir/checkpoints/<name>/), so they resume mid-point too.
    """
    module = experiment.module
    config_json = module.config_to_json(experiment.config)
    results = ResultsFile(
        Path(out_dir) / f"{experiment.name}.json", name=experiment.name, kind=experiment.kind, config=config_json
    )
    if results.previous is not None:
        print(f"{results.path}: config changed; previous results kept in {results.previous}", file=sys.stderr)
    results.payload["command"] = experiment.command
    todo = [point for point in module.points(experiment.config) if not results.done(point)]
    total = len(module.points(experiment.config))
    started = time.perf_counter()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[point]}"),
        disable=not progress,
        transient=False,
    ) as bar:
        task = bar.add_task(experiment.name, total=total, completed=total - len(todo), point="")
        inner = bar.add_task("", total=None, visible=False, point="")

        def update(description: str, completed: int, total: int) -> None:
            bar.update(inner, description=f"  {description}", completed=completed, total=total, visible=True)

        keywords = _point_keywords(module.run_point, update, Path(out_dir) / "checkpoints" / experiment.name)
        for point in todo:
            bar.update(task, point=", ".join(f"{k}={v}" for k, v in point.items()))
            results.add(point, module.run_point(experiment.config, point, **keywords))
            bar.update(inner, visible=False)
            bar.advance(task)
    results.payload["run_seconds"] = round(results.payload.get("run_seconds", 0.0) + time.perf_counter() - started, 2)
    results.finish()
    return results.path
