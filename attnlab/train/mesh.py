"""The device mesh: three named axes, "data", "fsdp" and "tensor".

    mesh = data x fsdp x tensor devices
    batch [B, ...]      split over ("data", "fsdp"): each device holds B / (data * fsdp) rows
    parameters          by logical axes (attnlab.train.sharding): a model dimension ("embed") split
                        over "fsdp" (ZeRO-3 / FSDP), heads and the MLP width over "tensor"
                        (Megatron-style tensor parallelism); replicated over "data"
    optimizer state     as its parameter

One CPU device is the degenerate mesh 1 x 1 x 1 (the same code path); `make_mesh(4)` is the
data-parallel mesh 4 x 1 x 1 of earlier versions. Several hosts run the same program after
`jax.distributed.initialize()` (README, "Training on many devices"); the mesh then spans every
host's devices and each process feeds its own share of the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attnlab.train.optimizer import check_count

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the mesh axes the batch is split over


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The shape of the device mesh: data x fsdp x tensor devices.

    data: data-parallel replicas (0: automatic, every device fsdp x tensor leave over, reduced to
      the largest number that divides the batch; see `resolve`);
    fsdp: devices each parameter's model dimension and the batch are split over (FSDP);
    tensor: devices the heads and the MLP width are split over (tensor parallelism).
    """

    data: int = 0
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        check_count(self.data, "MeshConfig.data", 0)
        check_count(self.fsdp, "MeshConfig.fsdp", 1)
        check_count(self.tensor, "MeshConfig.tensor", 1)

    @property
    def automatic(self) -> bool:
        return self.data == 0

    def resolve(self, devices: int, batch_size: int | None = None) -> MeshConfig:
        """The explicit mesh on `devices` devices for a global batch of `batch_size` rows.

        An automatic data axis takes every device fsdp x tensor leave; with a batch that does not
        divide over data x fsdp it shrinks to the largest data that does (a notice on stderr says
        how many devices stay idle). An explicit mesh larger than `devices`, or whose data x fsdp
        does not divide the batch, is a ValueError naming both.
        """
        model = self.fsdp * self.tensor
        if model > devices:
            raise ValueError(
                f"the mesh fsdp x tensor = {self.fsdp} x {self.tensor} needs {model} devices; {devices} here"
            )
        if batch_size is not None and batch_size % self.fsdp:
            raise ValueError(
                f"the batch size {batch_size} must be a multiple of the mesh's fsdp = {self.fsdp} (the batch is "
                f"split over data x fsdp): change the batch size or the mesh"
            )
        if not self.automatic:
            if self.data * model > devices:
                raise ValueError(
                    f"the mesh data x fsdp x tensor = {self.data} x {self.fsdp} x {self.tensor} needs "
                    f"{self.data * model} devices; {devices} here"
                )
            if batch_size is not None and batch_size % (self.data * self.fsdp):
                raise ValueError(
                    f"the batch size {batch_size} must be a multiple of data x fsdp = {self.data} x {self.fsdp} "
                    f"= {self.data * self.fsdp} (the mesh's batch axes): change the batch size or the mesh"
                )
            return self
        available = devices // model
        data = available
        if batch_size is not None:
            data = max(d for d in range(1, available + 1) if available % d == 0 and batch_size % (d * self.fsdp) == 0)
            if data < available:
                print(
                    f"mesh: the batch size {batch_size} divides over {data * self.fsdp} of {available * self.fsdp} "
                    f"batch devices; {(available - data) * model} devices stay idle (set a batch size that is a "
                    f"multiple of {available * self.fsdp} to use them all)",
                    file=sys.stderr,
                )
        return dataclasses.replace(self, data=data)


_DEFAULT_MESH: list[MeshConfig] = [MeshConfig()]


def default_mesh_config() -> MeshConfig:
    """The MeshConfig `make_mesh()` uses: `MeshConfig()` (every device on the data axis) or the one
    set by the innermost `use_mesh`."""
    return _DEFAULT_MESH[-1]


@contextlib.contextmanager
def use_mesh(config: MeshConfig) -> Iterator[MeshConfig]:
    """Within the block, `make_mesh()` (and so `train`, `evaluate` and the experiment kinds, which
    take the default mesh) builds meshes of `config`: how `attnlab run` applies a config's [mesh]."""
    if not isinstance(config, MeshConfig):
        raise TypeError(f"use_mesh: config must be a MeshConfig; got {type(config).__name__}")
    _DEFAULT_MESH.append(config)
    try:
        yield config
    finally:
        _DEFAULT_MESH.pop()


def make_mesh(num_devices: int | MeshConfig | None = None, *, batch_size: int | None = None) -> Mesh:
    """A data x fsdp x tensor mesh over the first devices jax sees (every host's).

    num_devices: an int n (the data-parallel mesh n x 1 x 1 on the first n devices), a
      `MeshConfig`, or None (`default_mesh_config()`: every device on the data axis unless a
      `use_mesh` block says otherwise).
    batch_size: the global batch, checked against the batch axes (and, for an automatic data
      axis, the size it shrinks to; see `MeshConfig.resolve`).
    """
    devices = jax.devices()
    if num_devices is None:
        config = default_mesh_config()
    elif isinstance(num_devices, MeshConfig):
        config = num_devices
    else:
        if isinstance(num_devices, bool) or not isinstance(num_devices, int) or not 1 <= num_devices <= len(devices):
            raise ValueError(
                f"make_mesh: num_devices must be an int in [1, {len(devices)}] (the devices jax sees) or a "
                f"MeshConfig; got {num_devices!r}"
            )
        config = MeshConfig(data=num_devices)
    config = config.resolve(len(devices), batch_size)
    shape = (config.data, config.fsdp, config.tensor)
    return Mesh(np.asarray(devices[: math.prod(shape)]).reshape(shape), AXES)


def mesh_config(mesh: Mesh) -> MeshConfig:
    """The MeshConfig of a mesh made by `make_mesh` (a mesh lacking an axis has it of size 1)."""
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    return MeshConfig(**{axis: sizes.get(axis, 1) for axis in AXES})


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole value (metrics, scalars, small parameters)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The axes of `mesh` the batch is split over: "data" and "fsdp", those the mesh has."""
    return tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis is split over data x fsdp; the rest is whole on each device."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def batch_devices(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the batch axes' sizes."""
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    return math.prod(sizes[axis] for axis in batch_axes(mesh))


def shard_batch(batch: Any, mesh: Mesh, *, global_batch: bool = False) -> Any:
    """Place a batch pytree of host arrays [B, ...] on the mesh, split along the batch over data x fsdp.

    global_batch=False: B is this process's share of the global batch B * process_count (each
      process reads its own rows, as a multi-host data loader does);
    global_batch=True: every process passes the whole global batch (as the experiment kinds do,
      each building the same batches from the seed) and each device takes its own rows.
    The global batch must divide evenly over the batch axes.
    """
    ways = batch_devices(mesh)
    processes = 1 if global_batch else jax.process_count()
    sharding = batch_sharded(mesh)

    def place(x: Any) -> jax.Array:
        x = np.asarray(x)
        if (x.shape[0] * processes) % ways:
            share = "the global batch" if global_batch else f"this process's share, of {processes} processes"
            raise ValueError(
                f"shard_batch: the batch size {x.shape[0]} ({share}) must make a global batch that is a multiple "
                f"of the {ways} ways the mesh splits it (data x fsdp; {mesh.devices.size} devices in all)"
            )
        return jax.make_array_from_process_local_data(sharding, x, x.shape if global_batch else None)

    return jax.tree.map(place, batch)


def host_value(x: jax.Array) -> np.ndarray:
    """An array as a host numpy array, on every host of a multi-host mesh: a replicated array from
    this host's copy, a sharded one gathered from every host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
