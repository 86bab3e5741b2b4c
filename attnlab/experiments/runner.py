"""Load experiment configs, check them all, and run their sweeps: keyed points, one writer per folder.

A run of `experiment` into `out`:
  - holds `out/.lock` (an exclusive `flock`) for as long as it writes there; a second run on the
    same folder waits for it, saying which process it waits for;
  - computes every point's key (`Kind.point_key`: the config, the point, the device and the code)
    and reuses the records of each point whose key is in `out/<name>.json` or one of its archived
    versions; the others run, in order, and each finished point is saved at once (an interrupted
    run loses only the point in flight);
  - trains models under `out/checkpoints/`, each model in a folder keyed by its settings
    (see `attnlab.experiments.lm.train_model`), so a point interrupted mid-training resumes and a
    changed setting trains anew.

A config's `[mesh]` table (data, fsdp, tensor: `attnlab.train.MeshConfig`) sets the device mesh
every model of the run trains on. Like the device count, the mesh changes results only by float
rounding (tests/train/test_sharding.py), so it is recorded in the results file's environment and
is not part of any key: a run resumed on another mesh reuses its points and checkpoints. An
explicit mesh that does not fit the devices or a batch_size of the config stops the run before
any work.

On several processes (`attnlab.distributed`) every process runs every point (each feeds its
share of the batch, all save checkpoints together) and only process 0 holds the lock and writes
the results file; the processes check first that they run the same points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import inspect
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from attnlab import distributed
from attnlab.experiments.config import ConfigError, apply_overrides, parse_dataclass, read_toml
from attnlab.experiments.kind import Kind
from attnlab.experiments.results import ResultsFile, device, now
from attnlab.progress import item_bar
from attnlab.train.mesh import MeshConfig, use_mesh

NAME_KEYS = ("kind", "name")
MESH_KEY = "mesh"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_RULE = "1 to 100 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A checked config: which kind, the results name, and the kind's Config."""

    kind: str
    name: str
    config: Any
    source: str
    command: str = ""
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    @property
    def spec(self) -> Kind:
        from attnlab.experiments.kinds import KINDS

        return KINDS[self.kind]


def check_name(name: Any, where: str) -> str | None:
    """A problem with a results name (it becomes a file name), or None when it is fine."""
    if isinstance(name, str) and NAME_PATTERN.fullmatch(name):
        return None
    shown = repr(name) if not isinstance(name, str) or len(name) <= 60 else repr(name[:60] + "...")
    length = f" ({len(name)} characters)" if isinstance(name, str) and len(name) > 100 else ""
    return f"{where}: name = {shown}{length} is not a plain file name; accepted: {NAME_RULE}"


def from_table(table: dict[str, Any], source: str, default_name: str) -> Experiment:
    """Check a TOML table and build its Experiment, or raise ConfigError with every problem."""
    from attnlab.experiments.kinds import KINDS

    problems: list[str] = []
    kind = table.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        problems.append(f"{source}: kind = {kind!r} is not an experiment kind; available: {', '.join(KINDS)}")
    explicit = "name" in table
    name = table.get("name", default_name)
    problem = check_name(name, source)
    if problem:
        hint = "" if explicit else ' (it defaults to the file\'s stem: set name = "..." in the config)'
        problems.append(problem + hint)
    mesh = _mesh_table(table.get(MESH_KEY, {}), source, problems)
    body = {k: v for k, v in table.items() if k not in (*NAME_KEYS, MESH_KEY)}
    config = None
    if isinstance(kind, str) and kind in KINDS:
        config = parse_dataclass(KINDS[kind].config_type, body, source, problems)
    if problems:
        raise ConfigError(problems)
    return Experiment(kind, name, config, source, mesh=mesh or MeshConfig())


def _mesh_table(table: Any, source: str, problems: list[str]) -> MeshConfig | None:
    """The MeshConfig of a config's [mesh] table (data, fsdp, tensor), or None with its problems added."""
    fields = [f.name for f in dataclasses.fields(MeshConfig)]
    if not isinstance(table, dict):
        problems.append(f"{source}: mesh = {table!r} must be a table with keys {', '.join(fields)}")
        return None
    unknown = [key for key in table if key not in fields]
    if unknown:
        problems.append(f"{source}: [mesh] has unknown keys {', '.join(unknown)}; accepted: {', '.join(fields)}")
        return None
    try:
        return MeshConfig(**table)
    except ValueError as error:
        problems.append(f"{source}: [mesh] {error}")
        return None


def _batch_sizes(value: Any, key: str = "") -> Iterator[tuple[str, int]]:
    """(dotted key, value) of every batch_size in a config's JSON."""
    if isinstance(value, dict):
        for name, item in value.items():
            dotted = f"{key}.{name}" if key else name
            if name == "batch_size" and isinstance(item, int):
                yield dotted, item
            else:
                yield from _batch_sizes(item, dotted)


def check_mesh(experiment: Experiment, devices: int) -> None:
    """ConfigError when the experiment's mesh does not fit `devices` or one of its batch sizes."""
    problems = []
    sizes = list(_batch_sizes(experiment.spec.config_json(experiment.config))) or [("", None)]
    for key, size in sizes:
        try:
            experiment.mesh.resolve(devices, None if experiment.mesh.automatic else size)
        except ValueError as error:
            where = f" ({key} = {size})" if key else ""
            problems.append(f"{experiment.source}: [mesh]{where}: {error}")
    if problems:
        raise ConfigError(problems)


def load(path: str | Path, overrides: list[str] = ()) -> Experiment:
    """Read and check one TOML config (with `key=value` overrides)."""
    path = Path(path)
    table = apply_overrides(read_toml(path), list(overrides), str(path))
    experiment = from_table(table, str(path), path.stem)
    command = " ".join(["attnlab run", str(path), *(f"--set {o}" for o in overrides)])
    return dataclasses.replace(experiment, command=command)


def load_all(paths: list[str | Path], overrides: list[str] = ()) -> list[Experiment]:
    """Check every config before any work; one ConfigError lists the problems of all files,
    including two configs that would write the same results name."""
    experiments, problems = [], []
    for path in paths:
        try:
            experiments.append(load(path, overrides))
        except ConfigError as err:
            problems.extend(err.problems)
    sources: dict[str, list[str]] = {}
    for experiment in experiments:
        sources.setdefault(experiment.name, []).append(experiment.source)
    for name, where in sources.items():
        if len(where) > 1:
            problems.append(
                f"{', '.join(where)}: all write results name {name!r} (one would overwrite the other); "
                'give each a distinct name = "..."'
            )
    if problems:
        raise ConfigError(problems)
    return experiments


@contextlib.contextmanager
def lock(out_dir: str | Path, *, wait: bool = True) -> Iterator[Path]:
    """Hold `out_dir/.lock` exclusively (one writer per results folder). A second holder waits
    (wait=True), saying on stderr which process holds it, or gets RuntimeError (wait=False).
    The lock is the kernel's (`flock`): it is released when the holder exits, however it exits."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    handle = open(path, "a+")  # noqa: SIM115 (held for the duration of the context)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            message = f"{out_dir} is being written by {holder}"
            if not wait:
                raise RuntimeError(f"{message}; wait for it to finish or use another --out") from None
            print(f"{message}; waiting for it to finish (Ctrl-C to stop)", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} ({' '.join(sys.argv)[:200]}), since {now()}\n")
        handle.flush()
        yield path
    finally:
        handle.close()


def _point_keywords(run_point: Any, update: Any, workdir: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The optional keywords a kind's run_point takes: `progress(description, completed, total)`
    to show work inside a long point, `workdir`, a folder for its checkpoints, and `records`, a
    copy of the run's records so far (those of the points before it, reused ones included: e.g.
    the learning-rate tuning a main point reads, see `attnlab.experiments.lm.TuningSetting`)."""
    accepted = inspect.signature(run_point).parameters
    offered = {"progress": update, "workdir": workdir, "records": records}
    return {name: value for name, value in offered.items() if name in accepted}


def _describe(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def run(experiment: Experiment, out_dir: str | Path, *, progress: bool = True, write: bool | None = None) -> Path:
    """Run every sweep point whose key is not in out_dir/<name>.json (or an archived version of
    it); returns that path. The caller holds `lock(out_dir)` (the CLI does); see the module
    docstring for what is reused, saved and kept. write: whether this process writes the
    results file and shows progress (default: `attnlab.distributed.is_writer()`, process 0)."""
    kind = experiment.spec
    out_dir = Path(out_dir)
    write = distributed.is_writer() if write is None else write
    points = kind.points(experiment.config)
    here = device()
    keyed = [(point, kind.point_key(experiment.config, point, here)) for point in points]
    results = ResultsFile(
        out_dir / f"{experiment.name}.json",
        name=experiment.name,
        kind=kind.name,
        config=kind.config_json(experiment.config),
        command=experiment.command,
        write=write,
        keys=[key for _, key in keyed],
        environment_extra={"mesh": dataclasses.asdict(experiment.mesh), "code": kind.code()},
    )
    check_mesh(experiment, jax.device_count())
    todo = [(point, key) for point, key in keyed if not results.done(key)]
    reused = [(point, key) for point, key in todo if results.reusable(key)]
    if write and results.replaces is not None:
        print(
            f"{results.path}: {results.replaced_because}; it is kept as {results.replaces} "
            "once this run finishes its first point",
            file=sys.stderr,
        )
    if write and reused:
        print(f"{experiment.name}: {len(reused)} of {len(points)} points reused from earlier results", file=sys.stderr)
    results.reuse([key for _, key in reused])
    todo = [(point, key) for point, key in todo if not results.done(key)]
    distributed.check_same_everywhere(" ".join(key for _, key in todo), f"{experiment.name}: the points to run")
    started = time.perf_counter()
    with item_bar(progress and write) as bar:
        task = bar.add_task(experiment.name, total=len(points), completed=len(points) - len(todo), item="")
        inner = bar.add_task("", total=None, visible=False, item="")

        def update(description: str, completed: int, total: int) -> None:
            bar.update(inner, description=f"  {description}", completed=completed, total=total, visible=True)

        for point, key in todo:
            bar.update(task, item=_describe(point))
            keywords = _point_keywords(
                kind.run_point, update, out_dir / CHECKPOINTS, [dict(r) for r in results.records]
            )
            with use_mesh(experiment.mesh):
                results.add(point, key, kind.run_point(experiment.config, point, **keywords))
            bar.update(inner, visible=False)
            bar.advance(task)
    summary = None if kind.summarize is None else kind.summarize(experiment.config, results.records)
    results.finish(time.perf_counter() - started, summary)
    return results.path


__all__ = ["Experiment", "check_name", "load", "load_all", "lock", "run"]
