"""The device mesh for data-parallel training: one axis, "data", over which the batch is split.

One CPU device is the degenerate mesh (the same code path); several local devices split the batch;
several hosts run the same program after `jax.distributed.initialize()` (see README, "Training on
many devices"), each feeding its own share of the global batch.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named "data" over the first `num_devices` devices (default: all of them, every host)."""
    devices = jax.devices()
    if num_devices is not None:
        if isinstance(num_devices, bool) or not isinstance(num_devices, int) or not 1 <= num_devices <= len(devices):
            raise ValueError(
                f"make_mesh: num_devices must be an int in [1, {len(devices)}] (the devices jax sees); "
                f"got {num_devices!r}"
            )
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole value (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis is split over "data"; the rest is whole on each device."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a batch pytree of host arrays [B_local, ...] on the mesh, split along the batch.

    B_local is this process's share; the global batch is B_local * process_count. The global batch
    must divide evenly over the mesh's devices.
    """
    devices = mesh.devices.size
    local_devices = devices // jax.process_count()
    sharding = batch_sharded(mesh)

    def place(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.shape[0] % local_devices:
            raise ValueError(
                f"shard_batch: the batch size {x.shape[0]} (this process's share) must be a multiple of the "
                f"{local_devices} local devices of the mesh ({devices} devices in all)"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(place, batch)


def host_value(x: jax.Array) -> np.ndarray:
    """A replicated array as a host numpy array (works on every host of a multi-host mesh)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)
