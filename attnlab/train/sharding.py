"""Parameter and optimizer-state shardings by logical axis, for FSDP and tensor parallelism.

Each parameter array of a `TransformerLM` (or of a model built from its layers) gets one logical
name per dimension, from the layer it sits in and its own name:

    query/key/value/gate kernel   [F, N, H]      ("embed", "heads", "head_dim")
    out kernel                    [N, H, F]      ("heads", "head_dim", "embed")
    mlp up kernel                 [F, M]         ("embed", "mlp")
    mlp down kernel               [M, F]         ("mlp", "embed")
    embed embedding / head kernel [V, F]/[F, V]  ("vocab", "embed") / ("embed", "vocab")
    normalizer parameters         [N, 1, 1]      ("heads", None, None)
    biases                        their kernel's output names; norm scales and anything else: none

and `LOGICAL_AXIS_RULES` map the names onto the mesh (attnlab.train.mesh): "embed" over "fsdp",
"heads" and "mlp" over "tensor", the rest whole. This is the scheme of flax's logical axis rules
(`flax.linen.logical_to_mesh_axes`), read from the parameter paths rather than annotated in the
layers, so a model imported without annotations shards the same way. The optimizer state shards as
its parameters (`optax.tree_utils.tree_map_params`); its scalars (step counts) are replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attnlab.train.mesh import FSDP_AXIS, TENSOR_AXIS, replicated

LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", FSDP_AXIS),
    ("heads", TENSOR_AXIS),
    ("mlp", TENSOR_AXIS),
    ("head_dim", None),
    ("vocab", None),
)

# A kernel's logical names by its layer's name (the first `rank` of them: a per-head gate is [F, N]).
_HEAD_PROJECTIONS = ("query", "key", "value", "gate", "scale_gamma", "scale_beta")
_KERNELS: dict[str, tuple[str, ...]] = {
    **{name: ("embed", "heads", "head_dim") for name in _HEAD_PROJECTIONS},
    "out": ("heads", "head_dim", "embed"),
    "up": ("embed", "mlp"),
    "down": ("mlp", "embed"),
    "head": ("embed", "vocab"),
}
# A bias has its kernel's output dimensions.
_BIASES = {**{name: ("heads", "head_dim") for name in _HEAD_PROJECTIONS}, "out": ("embed",), "up": ("mlp",),
           "down": ("embed",), "head": ("vocab",)}  # fmt: skip


def _names(path: tuple[Any, ...]) -> list[str]:
    """The keys of a pytree path as strings, without flax's `.value` attribute (an nnx.Param's leaf)."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                names.append(key.name)
        else:
            names.append(str(getattr(key, "key", getattr(key, "idx", key))))
    return names


def logical_axes(path: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """The logical name of each dimension of the parameter at `path` (None: not split)."""
    names = _names(path)
    rank = len(shape)
    if len(names) >= 2:
        layer, param = names[-2], names[-1]
        if param == "kernel" and layer in _KERNELS and len(_KERNELS[layer]) >= rank:
            return _KERNELS[layer][:rank]
        if param == "bias" and layer in _BIASES and len(_BIASES[layer]) >= rank:
            return _BIASES[layer][:rank]
        if layer == "embed" and param == "embedding" and rank == 2:
            return ("vocab", "embed")
        if "normalizer" in names[:-1] and rank >= 1:
            return ("heads", *(None,) * (rank - 1))
    return (None,) * rank


def partition_spec(
    logical: tuple[str | None, ...], rules: tuple[tuple[str, str | None], ...] = LOGICAL_AXIS_RULES
) -> PartitionSpec:
    """The mesh axes of logical names by `rules` (a name without a rule is not split)."""
    table = dict(rules)
    return PartitionSpec(*(table.get(name) if name is not None else None for name in logical))


def param_shardings(params: Any, mesh: Mesh, rules: tuple[tuple[str, str | None], ...] = LOGICAL_AXIS_RULES) -> Any:
    """The NamedSharding of every leaf of `params` on `mesh` (axes of size 1 or absent: not split).

    Raises ValueError naming the parameter when a split dimension does not divide over its axis
    (e.g. 6 heads over tensor = 4).
    """
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))

    def sharding(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        shape = tuple(getattr(leaf, "shape", ()))
        spec = partition_spec(logical_axes(path, shape), rules)
        axes = []
        for dim, (size, axis) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True)):
            if axis is None or sizes.get(axis, 1) == 1:
                axes.append(None)
                continue
            if size % sizes[axis]:
                logical = logical_axes(path, shape)[dim]
                raise ValueError(
                    f"parameter {jax.tree_util.keystr(path)} {list(shape)}: its dimension {dim} ({logical!r}, "
                    f"{size}) does not divide over the mesh axis {axis!r} of {sizes[axis]} devices; choose a "
                    f"{axis} size that divides {size}"
                )
            axes.append(axis)
        return NamedSharding(mesh, PartitionSpec(*axes))

    return jax.tree_util.tree_map_with_path(sharding, params)


def optimizer_shardings(optimizer: optax.GradientTransformation, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """The shardings of `optimizer.init(params)`: each per-parameter leaf (Adam's moments) as its
    parameter (`shardings`, from `param_shardings`), every other leaf (counts) replicated."""
    state = jax.eval_shape(optimizer.init, params)
    return optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        state,
        shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def device_bytes(tree: Any, device: jax.Device | None = None) -> int:
    """Bytes of the arrays of `tree` held on `device` (default: this process's first device)."""
    device = jax.local_devices()[0] if device is None else device
    shards = (shard for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards)
    return sum(shard.data.nbytes for shard in shards if shard.device == device)
