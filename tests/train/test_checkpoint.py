"""Checkpoints (attnlab.train.checkpoint): orbax folders that keep the newest k steps, restore onto
another sharding, and refuse corrupt, non-finite or other-settings checkpoints with one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from attnlab.train import CheckpointError, checkpoint, make_mesh
from attnlab.train.step import TrainState


def _state(step=0, scale=1.0):
    """A small TrainState-shaped pytree whose values say which step saved it."""
    params = {"w": jnp.full((4, 3), scale, jnp.float32), "b": [jnp.arange(3.0, dtype=jnp.float32)]}
    return TrainState(jnp.asarray(step, jnp.int32), params, (jnp.zeros(2, jnp.float32),))


def _step_folders(folder):
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir())


def test_saving_five_steps_keeps_the_newest_two(tmp_path):
    folder = tmp_path / "run"
    for step in range(1, 6):
        assert checkpoint.save(folder, _state(step, float(step)), {"saved_at": step}, keep=2) == folder
    assert _step_folders(folder) == [4, 5]  # no older step, no temporary folder left
    assert checkpoint.latest_step(folder) == 5 and checkpoint.read_metadata(folder) == {"saved_at": 5}
    older, metadata = checkpoint.restore(folder, _state(), step=4)
    np.testing.assert_array_equal(older.params["w"], np.full((4, 3), 4.0))
    assert int(older.step) == 4 and metadata == {"saved_at": 4}
    with pytest.raises(CheckpointError, match=r"already holds step 5"):
        checkpoint.save(folder, _state(5), keep=2)


def test_a_relative_folder_saves_and_restores(tmp_path, monkeypatch):
    """`attnlab run --out results` gives relative folders; orbax's writer wants absolute ones."""
    monkeypatch.chdir(tmp_path)
    folder = "results/checkpoints/run"
    checkpoint.save(folder, _state(3, 3.0), {"saved_at": 3})
    restored, metadata = checkpoint.restore(folder, _state())
    np.testing.assert_array_equal(restored.params["w"], np.full((4, 3), 3.0))
    assert metadata == {"saved_at": 3} and checkpoint.latest_step(folder) == 3


@pytest.mark.parametrize("direction", ["mesh to device", "device to mesh"])
def test_restore_places_each_array_on_the_target_sharding(tmp_path, direction):
    mesh_sharding = NamedSharding(make_mesh(), PartitionSpec())
    device_sharding = SingleDeviceSharding(jax.devices()[0])
    saved_on, target_on = (
        (mesh_sharding, device_sharding) if direction == "mesh to device" else (device_sharding, mesh_sharding)
    )
    saved = jax.device_put(_state(3, 2.5), saved_on)
    checkpoint.save(tmp_path / "run", saved)
    restored, _ = checkpoint.restore(tmp_path / "run", jax.device_put(_state(), target_on))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        assert got.sharding == target_on, got.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _garbage(path):
    path.write_bytes(b"\x00not a checkpoint\xff")


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_garbage, _truncate], ids=["garbage", "truncated"])
def test_a_damaged_step_is_one_line_naming_it_and_what_to_do(tmp_path, damage):
    folder = tmp_path / "run"
    checkpoint.save(folder, _state(1), {"a": 1})
    checkpoint.save(folder, _state(2), {"a": 2})
    for path in (folder / "2").rglob("*"):
        if path.is_file():
            damage(path)
    for read in (lambda: checkpoint.restore(folder, _state()), lambda: checkpoint.read_metadata(folder)):
        with pytest.raises(CheckpointError) as caught:
            read()
        message = str(caught.value)
        assert "\n" not in message, message
        assert message.startswith(f"checkpoint {str(folder / '2')!r} is corrupt or unreadable ("), message
        assert message.endswith(f"delete {str(folder / '2')!r} to resume from step 1, or {str(folder)!r} to train anew")
    restored, metadata = checkpoint.restore(folder, _state(), step=1)  # the older step is intact
    assert int(restored.step) == 1 and metadata == {"a": 1}


def test_a_file_where_the_folder_should_be_is_one_line_naming_it(tmp_path):
    path = tmp_path / "run.npz"
    path.write_bytes(b"PK\x03\x04 an old npz checkpoint")
    for read in (lambda: checkpoint.restore(path, _state()), lambda: checkpoint.latest_step(path)):
        with pytest.raises(
            CheckpointError, match=r"^checkpoint folder '.*run\.npz' is a file, not a folder .*delete it"
        ):
            read()
    with pytest.raises(CheckpointError, match=r"'.*none' does not exist"):
        checkpoint.restore(tmp_path / "none", _state())
    assert checkpoint.latest_step(tmp_path / "none") is None


def test_nan_is_never_saved_and_refused_on_restore(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    bad = _state(1)._replace(params={"w": jnp.full((4, 3), jnp.nan), "b": [jnp.arange(3.0, dtype=jnp.float32)]})
    with pytest.raises(CheckpointError, match=r"not saving step 1 to .*: \.params\['w'\] holds NaN or inf"):
        checkpoint.save(folder, bad)
    assert checkpoint.latest_step(folder) is None
    with monkeypatch.context() as patch:  # a checkpoint made by other code, or damaged into NaN
        patch.setattr(checkpoint, "first_nonfinite", lambda tree: None)
        checkpoint.save(folder, bad)
    with pytest.raises(CheckpointError) as caught:
        checkpoint.restore(folder, _state())
    assert str(caught.value) == (
        f"checkpoint {str(folder / '1')!r} holds NaN or inf in .params['w']; delete the folder {str(folder)!r} "
        "to train anew"
    )
    inf = _state(2)._replace(opt_state=(jnp.asarray([0.0, jnp.inf]),))
    assert checkpoint.first_nonfinite(inf) == ".opt_state[0]" and checkpoint.first_nonfinite(_state()) is None


def test_other_settings_are_refused_naming_the_keys(tmp_path):
    folder = tmp_path / "run"
    settings = {"model": {"width": 32, "heads": (2, 4)}, "training": {"learning_rate": 0.01, "seed": 0}}
    checkpoint.save(folder, _state(1), {"settings": settings})
    other = {"model": {"width": 64, "heads": [2, 4]}, "training": {"learning_rate": 0.05, "seed": 0}}
    with pytest.raises(CheckpointError) as caught:
        checkpoint.restore(folder, _state(), settings=other)
    message = str(caught.value)
    assert message.startswith(
        f"checkpoint folder {str(folder)!r} was saved with other settings "
        "(model.width: saved 32, given 64; training.learning_rate: saved 0.01, given 0.05)"
    ), message
    assert message.endswith("delete it to train anew") and "\n" not in message
    same = {"model": {"width": 32, "heads": [2, 4]}, "training": {"seed": 0, "learning_rate": 0.01}}
    assert int(checkpoint.restore(folder, _state(), settings=same)[0].step) == 1  # order and tuple/list alike
    assert int(checkpoint.restore(folder, _state())[0].step) == 1  # no settings given: nothing to compare
