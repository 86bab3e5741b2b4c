"""Several processes, one program: starting `jax.distributed` from the launcher's environment.

A run on several hosts (or several processes on one host) starts the same command in every
process; each must call `jax.distributed.initialize` before any JAX computation, after which
`jax.devices()` lists every process's devices and one `jax.sharding.Mesh` spans them all.
`initialize()` decides from the environment whether this process is one of several:

    launcher                     variables read                                  jax.distributed.initialize
    explicit (any launcher)      JAX_COORDINATOR_ADDRESS (host:port),            (address, count, id)
                                 JAX_NUM_PROCESSES, JAX_PROCESS_ID
    SLURM (srun)                 SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, ()  (jax detects SLURM)
                                 SLURM_PROCID, SLURM_LOCALID
    Open MPI 4 (mpirun)          OMPI_MCA_orte_hnp_uri, OMPI_COMM_WORLD_SIZE,     ()  (jax detects Open MPI)
                                 OMPI_COMM_WORLD_RANK
    none of these, or 1 process  -                                               not called

The SLURM and Open MPI rows are the variables jax 0.10's own cluster detection reads
(`jax._src.clusters`); jax reads JAX_COORDINATOR_ADDRESS itself but not a process count or id,
so the explicit form passes JAX_NUM_PROCESSES and JAX_PROCESS_ID as arguments. Under SLURM and
Open MPI jax gives each process one local accelerator (its SLURM_LOCALID / local rank): start one
task per GPU. Cross-process collectives on the CPU use gloo (jax 0.10's default, set here if a
program turned it off); GPUs use NCCL.

Only process 0 writes results and figures (`is_writer`); every process trains, feeding its own
share of each global batch, and takes part in saving and restoring checkpoints (orbax needs all).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping

MODES = ("auto", "on", "off")
EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
OPEN_MPI = ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")
ADDRESS = re.compile(r"\[?[A-Za-z0-9_.:-]+\]?:[0-9]{1,5}")


class DistributedError(ValueError):
    """A launcher environment that cannot start `jax.distributed`: the message names the variable,
    its value and what is accepted."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was started.

    Fields:
      launcher: "single" (one process), "explicit" (the JAX_* variables), "slurm", "openmpi", or
        "jax" (mode "on": whatever `jax.distributed.initialize()` detects by itself).
      num_processes: the processes of the run (None when jax alone detects it).
      process_id: this process's index in [0, num_processes) (None when jax alone detects it).
      coordinator_address: host:port of process 0's coordinator (explicit form only).
    """

    launcher: str
    num_processes: int | None = 1
    process_id: int | None = 0
    coordinator_address: str | None = None

    @property
    def distributed(self) -> bool:
        """Whether `jax.distributed.initialize` is called for this launch."""
        return self.launcher != "single"


def _count(environ: Mapping[str, str], name: str, low: int, high: int | None = None) -> int:
    """The integer in environ[name], in [low, high) (high None: no upper bound), else DistributedError."""
    value = environ[name]
    accepted = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high})"
    try:
        number = int(value.strip())
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number >= high):
        raise DistributedError(f"{name}={value!r} is not {accepted}")
    return number


def _explicit(environ: Mapping[str, str]) -> Launch:
    """The launch described by JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
    missing = [name for name in EXPLICIT if name not in environ]
    if missing:
        given = ", ".join(f"{name}={environ[name]!r}" for name in EXPLICIT if name in environ)
        raise DistributedError(
            f"{given} set but {', '.join(missing)} not: the explicit form needs all of {', '.join(EXPLICIT)} "
            "(e.g. JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0), "
            "or none of them under SLURM or Open MPI"
        )
    address = environ["JAX_COORDINATOR_ADDRESS"]
    if not ADDRESS.fullmatch(address.strip()):
        raise DistributedError(
            f"JAX_COORDINATOR_ADDRESS={address!r} is not host:port (process 0's host, a free port; "
            "e.g. 'localhost:12345' or '10.0.0.1:12345')"
        )
    count = _count(environ, "JAX_NUM_PROCESSES", 1)
    index = _count(environ, "JAX_PROCESS_ID", 0, count)
    if count == 1:
        return Launch("single")
    return Launch("explicit", count, index, address.strip())


def _cluster(environ: Mapping[str, str], launcher: str, count: str, index: str) -> Launch:
    """A SLURM or Open MPI launch (jax detects it): one process when the task count is 1."""
    processes = _count(environ, count, 1)
    process = _count(environ, index, 0, processes)
    return Launch(launcher, processes, process) if processes > 1 else Launch("single")


def detect(environ: Mapping[str, str], mode: str = "auto") -> Launch:
    """The launch this environment describes (a pure function of `environ`; see the module table).

    mode: "auto" (the table), "off" (one process, whatever the environment says) or "on" (always
    initialize: the explicit form if its variables are set, else whatever
    `jax.distributed.initialize()` detects, e.g. Kubernetes, Cloud TPU or mpi4py).
    """
    if mode not in MODES:
        raise DistributedError(f"distributed mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "off":
        return Launch("single")
    if any(name in environ for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")):
        launch = _explicit(environ)
    elif all(name in environ for name in SLURM):
        launch = _cluster(environ, "slurm", "SLURM_NTASKS", "SLURM_PROCID")
    elif all(name in environ for name in OPEN_MPI):
        launch = _cluster(environ, "openmpi", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")
    else:
        launch = Launch("single")
    if mode == "on" and not launch.distributed:
        return Launch("jax", None, None)
    return launch


def initialize(mode: str = "auto", environ: Mapping[str, str] | None = None) -> Launch:
    """Start `jax.distributed` when the environment (default: os.environ) says this process is one
    of several (see `detect`); returns the launch. Call it before any JAX computation.

    Does nothing on a single process, or when `jax.distributed` is already initialized (then the
    launch reports jax's process count and index). Raises DistributedError for an environment that
    names a malformed launch, RuntimeError (from jax) when the coordinator cannot be reached.
    """
    import jax

    launch = detect(os.environ if environ is None else environ, mode)
    if jax.distributed.is_initialized():
        return Launch("jax", jax.process_count(), jax.process_index())
    if not launch.distributed:
        return launch
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if launch.launcher == "explicit":
        jax.distributed.initialize(launch.coordinator_address, launch.num_processes, launch.process_id)
    else:
        jax.distributed.initialize()
    return dataclasses.replace(launch, num_processes=jax.process_count(), process_id=jax.process_index())


def is_writer() -> bool:
    """Whether this process writes results and figures: process 0 (the only one on one process)."""
    import jax

    return jax.process_index() == 0


def check_same_everywhere(text: str, what: str) -> None:
    """Raise RuntimeError unless every process passes the same `text` (a no-op on one process).

    A run whose processes disagree (e.g. each reads its own results folder and reuses different
    points) would wait forever in its first collective; this stops it with a message instead.
    """
    import jax

    if jax.process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(digest))
    differ = [i for i in range(everyone.shape[0]) if not np.array_equal(everyone[i], everyone[0])]
    if differ:
        raise RuntimeError(
            f"{what} differs between process 0 and process(es) {differ}: every process must see the same "
            "--out folder (a filesystem shared by all hosts) and the same config"
        )


__all__ = ["DistributedError", "Launch", "check_same_everywhere", "detect", "initialize", "is_writer"]
