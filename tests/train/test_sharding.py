"""Several devices: data parallelism, FSDP and tensor parallelism over the data x fsdp x tensor mesh
(forced CPU devices, each check in one subprocess: jax fixes its device count at import), the
logical axes of every parameter, the batch-size checks, and checkpoints restored across meshes."""

import os
import subprocess
import sys
import textwrap

import jax
import optax
import pytest
from flax import nnx

from attnlab.nn import ModelConfig, TransformerLM
from attnlab.train import split_model
from attnlab.train.mesh import MeshConfig, make_mesh
from attnlab.train.sharding import logical_axes, optimizer_shardings, param_shardings


def run_on_devices(devices: int, script: str, timeout: int = 300) -> str:
    """Run `script` in a fresh python with `devices` forced CPU devices; its stdout (fails with its output)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _params(**kwargs):
    config = ModelConfig(**{"num_layers": 1, "width": 32, "num_heads": 4, "normalizer": "ssmax", **kwargs})
    return split_model(TransformerLM(config, rngs=nnx.Rngs(0)))[1]


# --- logical axes and the mesh, on one device --------------------------------------------------


def test_every_transformer_parameter_has_its_logical_axes():
    names = {
        jax.tree_util.keystr(path): logical_axes(path, leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(_params(gate="headwise"))[0]
    }
    block = "['blocks'][0]"
    assert names[f"{block}['attention']['query']['kernel'].value"] == ("embed", "heads", "head_dim")
    assert names[f"{block}['attention']['value']['kernel'].value"] == ("embed", "heads", "head_dim")
    assert names[f"{block}['attention']['out']['kernel'].value"] == ("heads", "head_dim", "embed")
    assert names[f"{block}['attention']['gate']['kernel'].value"] == ("embed", "heads")
    assert names[f"{block}['attention']['normalizer']['s'].value"] == ("heads", None, None)
    assert names[f"{block}['mlp']['up']['kernel'].value"] == ("embed", "mlp")
    assert names[f"{block}['mlp']['up']['bias'].value"] == ("mlp",)
    assert names[f"{block}['mlp']['down']['kernel'].value"] == ("mlp", "embed")
    assert names["['embed']['embedding'].value"] == ("vocab", "embed")
    assert names["['final_norm']['scale'].value"] == (None,)


def test_one_device_replicates_everything_and_adam_moments_follow_their_parameters():
    params = _params()
    mesh = make_mesh(1)
    shardings = param_shardings(params, mesh)
    assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings))
    state = optimizer_shardings(optax.adamw(1e-3), params, shardings, mesh)
    assert len(jax.tree.leaves(state)) == 2 * len(jax.tree.leaves(params)) + 1  # mu, nu, count


@pytest.mark.parametrize(
    ("config", "devices", "batch", "match"),
    [
        (MeshConfig(fsdp=4), 2, None, r"fsdp x tensor = 4 x 1 needs 4 devices; 2 here"),
        (MeshConfig(data=2, fsdp=1), 1, None, r"data x fsdp x tensor = 2 x 1 x 1 needs 2 devices; 1 here"),
        (MeshConfig(data=1, fsdp=2), 4, 5, r"batch size 5 must be a multiple of the mesh's fsdp = 2"),
        (MeshConfig(data=4), 4, 6, r"batch size 6 must be a multiple of data x fsdp = 4 x 1 = 4"),
    ],
)
def test_a_mesh_that_does_not_fit_the_devices_or_the_batch_is_a_clear_error(config, devices, batch, match):
    with pytest.raises(ValueError, match=match):
        config.resolve(devices, batch)


def test_an_automatic_data_axis_shrinks_to_what_the_batch_divides_and_says_so(capsys):
    assert MeshConfig().resolve(8, 8) == MeshConfig(data=8)
    assert MeshConfig().resolve(8, 6) == MeshConfig(data=2)
    assert "the batch size 6 divides over 2 of 8 batch devices; 6 devices stay idle" in capsys.readouterr().err
    assert MeshConfig(tensor=2).resolve(8, 4) == MeshConfig(data=4, tensor=2)
    with pytest.raises(ValueError, match=r"MeshConfig.fsdp must be an int >= 1; got 0"):
        MeshConfig(fsdp=0)


# --- several devices: the same losses on every mesh, less memory per device, checkpoints move ---

MESHES = """
import itertools, tempfile
import jax, numpy as np
from flax import nnx
from attnlab.data.batch import Batch
from attnlab.nn import ModelConfig, TransformerLM
from attnlab.train import OptimizerConfig, TrainConfig, make_mesh, shard_batch, train
from attnlab.train.mesh import MeshConfig
from attnlab.train.sharding import device_bytes

assert jax.device_count() == 8, jax.devices()

def stream():
    for step in range(4):
        data = np.random.default_rng(step).integers(0, 16, size=(8, 17)).astype(np.int32)
        yield Batch(data[:, :-1], data[:, 1:], np.ones((8, 16), bool))

def model():
    config = ModelConfig(num_layers=1, width=32, num_heads=2, normalizer="ssmax")
    return TransformerLM(config, rngs=nnx.Rngs(0))

config = TrainConfig(steps=4, log_every=1, optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1))
meshes = {
    "1": MeshConfig(data=1), "fsdp4": MeshConfig(data=1, fsdp=4), "fsdp8": MeshConfig(data=1, fsdp=8),
    "2x2x2": MeshConfig(data=2, fsdp=2, tensor=2),
}
losses, memory = {}, {}
for name, mesh in meshes.items():  # (fsdp = 2 trains below, resuming a checkpoint)
    result = train(model(), stream(), config, mesh=make_mesh(mesh), progress=False)
    losses[name] = [r["loss"] for r in result.history]
    memory[name] = device_bytes((result.state.params, result.state.opt_state))
    np.testing.assert_allclose(losses[name], losses["1"], rtol=2e-5, err_msg=name)
embedding = result.state.params["embed"]["embedding"][...]  # [V, F] on 2 x 2 x 2: F over fsdp
assert embedding.addressable_shards[0].data.shape == (256, 16), embedding.sharding
query = result.state.params["blocks"][0]["attention"]["query"]["kernel"][...]  # [F, N, H]: heads over tensor
assert query.addressable_shards[0].data.shape == (16, 1, 16), query.sharding
# per-device bytes of parameters and optimizer state fall with fsdp (the norms' scales stay whole)
assert memory["1"] > memory["fsdp4"] > memory["fsdp8"], memory
assert memory["fsdp8"] < 0.2 * memory["1"], memory
sharded = shard_batch(next(stream()), make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
assert sharded.inputs.addressable_shards[0].data.shape == (2, 16)
try:
    train(model(), (Batch(*(x[:6] for x in b[:3])) for b in stream()), config, mesh=make_mesh(4), progress=False)
except ValueError as error:
    assert "the batch size 6 must be a multiple of the 4 ways the mesh" in str(error), error
else:
    raise AssertionError("a batch of 6 over 4 devices was accepted")
# a checkpoint saved on fsdp = 4 (its data ran out after 2 steps) resumes on fsdp = 2 (out after 3)
# and then on one device, with the losses of the uninterrupted run
folder = tempfile.mkdtemp() + "/run"
saving = TrainConfig(steps=4, log_every=1, checkpoint_every=1, optimizer=config.optimizer)
for name, available in (("fsdp4", 2), ("fsdp2", 3), ("1", 4)):
    mesh = make_mesh({**meshes, "fsdp2": MeshConfig(data=1, fsdp=2)}[name])
    try:
        resumed = train(model(), itertools.islice(stream(), available), saving, mesh=mesh, checkpoint=folder,
                        progress=False)
    except ValueError as error:
        assert f"ran out after {available} of 4 steps" in str(error), error
        continue
    assert len(resumed.state.params["embed"]["embedding"][...].sharding.device_set) == 1
    np.testing.assert_allclose([r["loss"] for r in resumed.history], losses["1"], rtol=2e-5)
print("MEMORY", {name: memory[name] for name in ("1", "fsdp4", "fsdp8")})
"""


def test_sharded_training_gives_the_one_device_losses_less_memory_per_device_and_moving_checkpoints():
    out = run_on_devices(8, MESHES)
    assert "MEMORY" in out, out
