"""Checkpoints: the whole training state (parameters, optimizer state, step) in one .npz file.

Each array is stored under its pytree path (e.g. "params['blocks'][0]['attention']['query']
['kernel'].value"), with a JSON string of metadata (the step and whatever the caller adds, such as
the model config). Writes are atomic (a temporary file in the same folder, then a rename), so an
interruption never leaves a half-written checkpoint. Restoring needs a target state of the same
structure (a freshly initialised one); names, shapes and dtypes are checked against it.

Multi-host: the state is replicated, so process 0 writes and every process reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from attnlab.atomic import write_atomic
from attnlab.train.mesh import host_value

METADATA_KEY = "__metadata__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into the given state (missing file, other structure)."""


def _named_leaves(state: Any) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]]


def save(path: str | Path, state: Any, metadata: dict[str, Any] | None = None) -> Path:
    """Write `state` (any pytree of arrays) and `metadata` (JSON values) to `path` atomically."""
    path = Path(path)
    if jax.process_index() != 0:
        return path
    arrays = {name: host_value(leaf) for name, leaf in _named_leaves(state)}
    arrays[METADATA_KEY] = np.asarray(json.dumps(metadata or {}))
    return write_atomic(path, lambda handle: np.savez(handle, **arrays), binary=True)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata saved with a checkpoint."""
    with _open(path) as data:
        return json.loads(str(data[METADATA_KEY]))


def _open(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read as an .npz file: {error}") from error


def restore(path: str | Path, target: Any) -> tuple[Any, dict[str, Any]]:
    """(state, metadata): the arrays of `path` in the structure of `target`.

    Every leaf of target must be in the file with the same shape and dtype, and the file must hold
    nothing else; otherwise CheckpointError lists the differences. Leaves keep target's sharding.
    """
    named = _named_leaves(target)
    with _open(path) as data:
        stored = set(data.files) - {METADATA_KEY}
        problems = []
        missing = [name for name, _ in named if name not in stored]
        extra = sorted(stored - {name for name, _ in named})
        if missing:
            problems.append(f"missing {len(missing)} arrays, e.g. {', '.join(missing[:3])}")
        if extra:
            problems.append(f"{len(extra)} arrays the model does not have, e.g. {', '.join(extra[:3])}")
        leaves = []
        for name, leaf in named:
            if name in missing:
                continue
            value = data[name]
            shape, dtype = tuple(np.shape(leaf)), np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
            if value.shape != shape or value.dtype != dtype:
                problems.append(f"{name}: stored {value.dtype}{list(value.shape)}, expected {dtype}{list(shape)}")
                continue
            sharding = getattr(leaf, "sharding", None)
            leaves.append(jax.device_put(value, sharding) if sharding is not None else value)
        if problems:
            raise CheckpointError(f"checkpoint {str(path)!r} does not match the model: " + "; ".join(problems))
        metadata = json.loads(str(data[METADATA_KEY]))
    return jax.tree.unflatten(jax.tree.structure(target), leaves), metadata
