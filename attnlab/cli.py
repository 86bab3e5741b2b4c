"""The `attnlab` command: run experiments, rebuild figures, list what is available.

    attnlab run [CONFIG.toml ...] [--out DIR] [--set key=value ...] [--no-figures] [--distributed auto|on|off]
    attnlab figures [RESULTS_DIR] [--no-progress]
    attnlab list

Exit codes: 0 success; 2 bad command line or config (nothing is run or written); 1 a run that
stopped (diverged training, an unreadable results file or checkpoint, a full disk), with one
message naming it; 130 interrupted. Finished sweep points are always kept.

`attnlab run` on several processes (one per host or per GPU, started by SLURM's srun, Open MPI's
mpirun or any launcher that sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID)
first starts `jax.distributed` (`attnlab.distributed.initialize`; --distributed off skips it):
every process trains, process 0 alone holds the results lock and writes results and figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from importlib import resources
from pathlib import Path

QUICKSTART = "quickstart.toml"


def _failures() -> tuple[type[BaseException], ...]:
    """Errors that stop a run with one message and exit code 1: diverged training
    (FloatingPointError), unreadable results or checkpoints, a full disk (OSError)."""
    from attnlab.experiments import ResultsError
    from attnlab.train import CheckpointError

    return (FloatingPointError, ResultsError, CheckpointError, OSError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnlab", description="A lab for attention normalizers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run experiment configs (no config: a small embedded default)")
    run.add_argument("configs", nargs="*", metavar="CONFIG.toml", help="experiment configs (experiments/*.toml)")
    run.add_argument("--out", default="results", metavar="DIR", help="results folder (default: results)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, value in TOML syntax (repeatable), e.g. --set seeds=2",
    )
    run.add_argument("--no-figures", action="store_true", help="write the JSON only")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--distributed",
        choices=("auto", "on", "off"),
        default="auto",
        help="start jax.distributed: auto (default) when SLURM, Open MPI or JAX_COORDINATOR_ADDRESS/"
        "JAX_NUM_PROCESSES/JAX_PROCESS_ID say this is one of several processes; on: always (jax detects "
        "the cluster); off: never",
    )

    figures = commands.add_parser("figures", help="rebuild every figure and the index from results JSON")
    figures.add_argument("results_dir", nargs="?", default="results", metavar="RESULTS_DIR")
    figures.add_argument("--no-progress", action="store_true", help="no progress bar")

    commands.add_parser("list", help="list experiment kinds and normalizers")
    return parser


def _start(mode: str) -> bool | None:
    """Start jax.distributed as `mode` says (before any JAX computation); whether this process
    writes the results (process 0), or None after printing why the launch is malformed."""
    from attnlab import distributed

    try:
        launch = distributed.initialize(mode)
    except distributed.DistributedError as err:
        print(f"attnlab run: cannot start several processes: {err}; nothing was run", file=sys.stderr)
        return None
    writer = distributed.is_writer()
    if launch.distributed and writer:
        print(f"attnlab run: {launch.num_processes} processes ({launch.launcher}); process 0 writes the results")
    return writer


def _run(args: argparse.Namespace) -> int:
    writer = _start(args.distributed)
    if writer is None:
        return 2
    import jax

    from attnlab import experiments, figures
    from attnlab.experiments.runner import check_mesh

    try:
        if args.configs:
            to_run = experiments.load_all(args.configs, args.overrides)
        else:
            with resources.as_file(resources.files("attnlab.experiments") / QUICKSTART) as path:
                default = experiments.load(path, args.overrides)
            to_run = [dataclasses.replace(default, source="embedded default", command="attnlab run")]
        for experiment in to_run:  # before any work: a mesh that does not fit the devices or a batch
            check_mesh(experiment, jax.device_count())
    except experiments.ConfigError as err:
        print(f"attnlab run: {len(err.problems)} problem(s) in the config, nothing was run:", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    if Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"attnlab run: --out {args.out} is a file; give a folder for the results", file=sys.stderr)
        return 2
    # One writer per folder: the other processes of a multi-process run write nothing there but
    # their part of each checkpoint (orbax), so they neither take the lock nor wait for it.
    with experiments.lock(args.out) if writer else contextlib.nullcontext():
        for experiment in to_run:
            started = time.perf_counter()
            try:
                path = experiments.run(experiment, args.out, progress=not args.no_progress, write=writer)
            except KeyboardInterrupt:
                print(f"\ninterrupted: finished sweep points are saved in {args.out}; rerun to resume", file=sys.stderr)
                return 130
            except _failures() as err:
                print(f"attnlab run: {experiment.name} stopped: {err}", file=sys.stderr)
                print(f"  finished sweep points are saved in {args.out}; nothing else was run", file=sys.stderr)
                return 1
            if not writer:
                continue
            print(f"{experiment.name}: wrote {path} in {time.perf_counter() - started:.1f} s")
            if not args.no_figures:
                for figure in figures.render(path):
                    print(f"  figure {figure}")
    return 0


def _figures(args: argparse.Namespace) -> int:
    from attnlab import figures
    from attnlab.experiments import ResultsError

    results_dir = Path(args.results_dir)
    if not results_dir.is_dir():
        print(f"attnlab figures: {results_dir} is not a folder of results JSON", file=sys.stderr)
        return 2
    try:
        rendered = figures.render_all(results_dir, progress=not args.no_progress)
    except (ResultsError, OSError) as err:
        print(f"attnlab figures: {err}", file=sys.stderr)
        return 1
    for json_path, paths in rendered.items():
        print(f"{json_path}: {len(paths)} files")
    print(f"index: {results_dir / 'README.md'}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from attnlab import experiments, normalizers

    print("experiment kinds:")
    for name, kind in experiments.KINDS.items():
        print(f"  {name:24s} {kind.description}")
    print("normalizers (name, attention family, math; parameters with defaults, * = a layer can learn it):")
    for entry in normalizers.entries():
        params = ", ".join(f"{p.name}={p.default}" + ("*" if p.learn else "") for p in entry.parameters)
        print(f"  {entry.name:16s} {entry.family:12s} {entry.summary}" + (f"  [{params}]" if params else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return {"run": _run, "figures": _figures, "list": _list}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
