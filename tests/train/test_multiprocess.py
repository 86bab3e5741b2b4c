"""Two processes x 2 forced CPU devices train as one 4-device process does, for real.

The test launches the worker below three times: two processes together (a localhost coordinator,
gloo CPU collectives, started by `attnlab.distributed.initialize` from JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID, the way `attnlab run` starts), then one process with 4
forced devices. The two processes train a tiny LM with `attnlab.train.train`, each feeding its
rows of every global batch, for 2 of 4 steps (a checkpoint at step 2), and resume from that
checkpoint; the one process trains the same 4 steps uninterrupted and resumes from the two
processes' checkpoint. Each then runs `attnlab run` on a one-point MQAR config, logging every
file the atomic writer puts in place. About 75 s on 2 busy CPU cores, 3 compiles per process;
the late-save test 10 s more.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # seconds, each launch
MQAR = [
    "normalizers=['softmax']",
    "widths=[8]",
    "seeds=[0]",
    "eval_examples=64",
    "training.log_every=1",
    "training.checkpoint_every=2",
]

WORKER = textwrap.dedent(
    """
    import json, os, shutil, sys
    from pathlib import Path

    from attnlab import distributed

    launch = distributed.initialize()  # the explicit JAX_* form for two processes; nothing for one
    import jax
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils

    from attnlab import cli
    from attnlab.data.batch import Batch
    from attnlab.nn import ModelConfig, TransformerLM
    from attnlab.train import MeshConfig, OptimizerConfig, TrainConfig, train

    root, role, mqar = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    rank, count = jax.process_index(), jax.process_count()
    assert jax.device_count() == 4 and jax.local_device_count() == 4 // count, jax.devices()
    B, T = 8, 16

    def stream(steps):
        # Global batch [8, 16] per step, the same on every process; this process feeds its rows.
        rows = slice(rank * B // count, (rank + 1) * B // count)
        for step in range(steps):
            data = np.random.default_rng(step).integers(0, 16, size=(B, T + 1)).astype(np.int32)
            yield Batch(data[rows, :-1], data[rows, 1:], np.ones((B // count, T), bool))

    config = TrainConfig(
        steps=4, log_every=1, checkpoint_every=2, optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1)
    )

    # The two processes shard each parameter over all 4 devices (fsdp = 4, across the processes);
    # the one process replicates them (data parallelism over its 4 devices).
    mesh = MeshConfig(data=1, fsdp=4) if role == "two" else None

    def fit(steps, checkpoint=None):
        model = TransformerLM(ModelConfig(num_layers=1, width=32, num_heads=2, normalizer="ssmax"), rngs=nnx.Rngs(0))
        try:
            result = train(model, stream(steps), config, checkpoint=checkpoint, progress=False, mesh=mesh)
        except ValueError as error:  # the batches ran out: an interrupted run, its checkpoint at step 2
            assert "ran out after 2 of 4 steps" in str(error), error
            return None
        return [entry["loss"] for entry in result.history]

    out = {"rank": rank, "count": count, "launch": launch.launcher}
    if role == "two":  # 2 steps, saved; restored and 2 more steps: the history of all 4
        assert fit(2, root / "saved_by_two") is None
        multihost_utils.sync_global_devices("saved")
        if rank == 0:  # the 1-process run resumes from the folder as saved, at step 2
            shutil.copytree(root / "saved_by_two", root / "resumed_by_two")
        multihost_utils.sync_global_devices("copied")
        out["losses"] = fit(4, root / "resumed_by_two")
    else:  # 4 steps uninterrupted; then 2 more after the two processes' step 2
        out["losses"] = fit(4)
        shutil.copytree(root / "saved_by_two", root / "resumed_by_one")
        out["resumed"] = fit(4, root / "resumed_by_one")

    # attnlab run: log every file the atomic writer (results, archive, figures, index) puts in place.
    replace, writes = os.replace, []
    os.replace = lambda source, target: (writes.append(str(target)), replace(source, target))[1]
    sets = [arg for value in mqar for arg in ("--set", value)]
    sets += ["--no-figures"] if role == "one" else ["--set", "mesh.fsdp=2"]  # data 2 x fsdp 2 over the processes
    config_file = str(Path(cli.__file__).parent.parent / "experiments" / "mqar_quick.toml")
    out["exit"] = cli.main(["run", config_file, "--out", str(root / f"out_{role}"), "--no-progress", *sets])
    os.replace = replace
    out["writes"] = writes
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _environment(devices: int, extra: dict[str, str]) -> dict[str, str]:
    launcher = ("JAX_", "SLURM_", "OMPI_")  # a test run inside a SLURM job is not a multi-process run
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return {**env, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **extra}


def _launch(root: Path, role: str, environments: list[dict[str, str]]) -> list[dict]:
    """Run the worker once per environment, all at once; each one's RESULT (asserting every one
    exits 0 within TIMEOUT, killing them all otherwise, with their output in the message)."""
    command = [sys.executable, "-c", WORKER, str(root), role, json.dumps(MQAR)]
    processes = [
        subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for env in environments
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT))
    except subprocess.TimeoutExpired:
        outputs.append(("", f"timed out after {TIMEOUT} s"))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    report = "\n".join(f"--- {role} process {i} ---\n{o[0][-3000:]}\n{o[1][-6000:]}" for i, o in enumerate(outputs))
    assert len(outputs) == len(processes) and all(p.returncode == 0 for p in processes), report
    results = [json.loads(line[len("RESULT ") :]) for o in outputs for line in o[0].splitlines() if "RESULT " in line]
    assert len(results) == len(processes), report
    return results


def _two_processes(devices: int) -> list[dict[str, str]]:
    """The environments of 2 processes with `devices` CPU devices each, joined on a free localhost port."""
    port = _free_port()
    joined = {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2"}
    return [_environment(devices, {**joined, "JAX_PROCESS_ID": str(i)}) for i in range(2)]


def _history_losses(path: Path) -> list[float]:
    payload = json.loads(path.read_text())
    (record,) = payload["records"]
    return [entry["loss"] for entry in record["history"]]


def test_two_processes_train_save_restore_and_write_once_as_one_four_device_process(tmp_path):
    two = _two_processes(2)
    first, second = _launch(tmp_path, "two", two)
    (one,) = _launch(tmp_path, "one", [_environment(4, {})])

    assert (first["rank"], second["rank"], first["count"], first["launch"]) == (0, 1, 2, "explicit")
    assert (one["count"], one["launch"]) == (1, "single")
    # Both processes see the global loss: 2 steps with FSDP over both, saved by both, restored by
    # both, 2 more steps, are the 4 steps of one process on 4 devices (to float rounding: the
    # sharded sums add in another order); and that process resumes from their sharded step 2.
    assert first["losses"] == second["losses"] and len(first["losses"]) == 4
    difference = np.abs(np.subtract(first["losses"], one["losses"]))
    print(f"two processes against one, max |loss difference|: {difference.max():.3g}, losses {one['losses']}")
    np.testing.assert_allclose(first["losses"], one["losses"], rtol=2e-5)
    np.testing.assert_allclose(one["resumed"], one["losses"], rtol=2e-5)

    # attnlab run: every process trains; process 0 alone writes the results, figures and index.
    assert first["exit"] == second["exit"] == one["exit"] == 0
    assert second["writes"] == []
    results = tmp_path / "out_two" / "mqar_quick.json"
    written = [Path(p).relative_to(tmp_path / "out_two").as_posix() for p in first["writes"]]
    assert written.count("mqar_quick.json") == 2, written  # after the point, then finished with its summary
    figures = {p for p in written if p.startswith("figures/")}
    assert len(figures) >= 2 and set(written) == {"mqar_quick.json", *figures}, written
    assert [Path(p).name for p in one["writes"]] == ["mqar_quick.json"] * 2  # (--no-figures)
    payload = json.loads(results.read_text())
    assert payload["environment"]["device_count"] == 4 and payload["finished_at"] is not None
    assert [r["normalizer"] for r in payload["records"]] == ["softmax"]
    assert payload["environment"]["mesh"] == {"data": 0, "fsdp": 2, "tensor": 1}
    np.testing.assert_allclose(
        _history_losses(results), _history_losses(tmp_path / "out_one" / results.name), rtol=2e-5
    )
    assert not list((tmp_path / "out_two").glob(".*.tmp")), "a temporary file was left behind"


LATE_SAVE = textwrap.dedent(
    """
    import sys, time
    from attnlab import distributed

    distributed.initialize()
    import jax, numpy as np
    from attnlab.train import checkpoint, make_mesh
    from attnlab.train.mesh import replicated

    state = {"w": jax.device_put(np.ones((4, 4), np.float32), replicated(make_mesh()))}
    if jax.process_index() == 1:
        time.sleep(2)  # a slower host: process 0 has made the folder by the time it looks
    checkpoint.save(sys.argv[1], state, step=0)
    print("RESULT " + str(checkpoint.latest_step(sys.argv[1])), flush=True)
    """
)


def test_a_process_that_arrives_late_saves_with_the_others(tmp_path):
    # Every orbax CheckpointManager opened is a barrier of all processes: a save must open the
    # same managers in every process whether or not another has already made the folder.
    environments = _two_processes(1)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", LATE_SAVE, str(tmp_path / "saved")],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env in environments
    ]
    try:
        outputs = [process.communicate(timeout=TIMEOUT) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    report = "\n".join(f"--- process {i} ---\n{out[-2000:]}\n{err[-4000:]}" for i, (out, err) in enumerate(outputs))
    assert all(process.returncode == 0 for process in processes), report
    assert all("RESULT 0" in out for out, _ in outputs), report


# --- which launches start jax.distributed (attnlab.distributed.detect, no process started) -------

EXPLICIT_TWO = {"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
SLURM_JOB = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}


def test_the_environment_names_the_launch():
    from attnlab.distributed import Launch, detect

    assert detect({}) == Launch("single")
    assert detect({"JAX_COORDINATOR_ADDRESS": "localhost:1234"}) == Launch("single")  # jax reads it, no count
    assert detect(EXPLICIT_TWO) == Launch("explicit", 2, 1, "localhost:1234")
    assert detect({**EXPLICIT_TWO, "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) == Launch("single")
    assert detect({**SLURM_JOB, "SLURM_NTASKS": "16"}) == Launch("slurm", 16, 3)
    assert detect({**SLURM_JOB, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == Launch("single")
    assert detect({k: v for k, v in SLURM_JOB.items() if k != "SLURM_STEP_NODELIST"}) == Launch("single")  # salloc
    ompi = {"OMPI_MCA_orte_hnp_uri": "1.2.3.4:5", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"}
    assert detect(ompi) == Launch("openmpi", 4, 0)
    assert detect({**SLURM_JOB, "SLURM_NTASKS": "16", **EXPLICIT_TWO}).launcher == "explicit"  # explicit first
    assert detect(EXPLICIT_TWO, "off") == Launch("single")
    assert detect({}, "on") == Launch("jax", None, None) and detect({}, "on").distributed
    assert not Launch("single").distributed and detect(EXPLICIT_TWO, "on").distributed


def test_a_malformed_launch_names_the_variable_its_value_and_what_is_accepted():
    from attnlab.distributed import DistributedError, detect

    cases = {
        "JAX_NUM_PROCESSES='two' is not an integer >= 1": {**EXPLICIT_TWO, "JAX_NUM_PROCESSES": "two"},
        "JAX_PROCESS_ID='2' is not an integer in [0, 2)": {**EXPLICIT_TWO, "JAX_PROCESS_ID": "2"},
        "JAX_COORDINATOR_ADDRESS='localhost' is not host:port": {
            **EXPLICIT_TWO,
            "JAX_COORDINATOR_ADDRESS": "localhost",
        },
        "JAX_PROCESS_ID='0' set but JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES not": {"JAX_PROCESS_ID": "0"},
        "SLURM_NTASKS='' is not an integer >= 1": {**SLURM_JOB, "SLURM_NTASKS": ""},
        "distributed mode 'yes' is not one of auto, on, off": {},
    }
    for message, environ in cases.items():
        with pytest.raises(DistributedError) as error:
            detect(environ, "yes" if not environ else "auto")
        assert message in str(error.value), error.value


def test_one_process_initializes_nothing_and_writes():
    import jax

    from attnlab import distributed

    assert distributed.initialize(environ={}) == distributed.Launch("single")
    assert not jax.distributed.is_initialized() and distributed.is_writer()
    distributed.check_same_everywhere("anything", "a test")  # one process: nothing to compare


def test_attnlab_run_refuses_a_malformed_launch_before_any_work(tmp_path, monkeypatch, capsys):
    from attnlab import cli

    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    assert cli.main(["run", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "JAX_NUM_PROCESSES='two' is not an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")  # one process: as without the variables
    from attnlab import distributed

    assert distributed.initialize() == distributed.Launch("single")
