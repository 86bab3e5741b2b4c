"""Checkpoints: the training state (parameters, optimizer state, step) in an orbax folder.

One model's checkpoint folder holds its last `keep` saves, one sub-folder per step:

    <folder>/<step>/state/      the state pytree (orbax PyTree, OCDBT): one array per leaf
    <folder>/<step>/metadata/   JSON: whatever the caller adds (`train` adds history, evaluations,
                                train_config and data_position, the batches consumed)

Saving is synchronous and atomic: orbax writes a temporary folder and renames it to <step> once
complete, so an interruption never leaves a half-written step, and only then deletes the steps
beyond the last `keep`. Restoring reads the newest step into a target state of the same structure
(a freshly initialised one), placed on the target's shardings, so a state saved on one device mesh
restores onto another. Every problem on restore (a missing, unreadable or corrupt folder, other
settings, other array names/shapes/dtypes, NaN or inf values) is one `CheckpointError` line naming
the folder, what is wrong and what to do.

Multi-host: every process calls `save` and `restore` (orbax coordinates the writes).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from attnlab.train.mesh import host_value

STATE = "state"
METADATA = "metadata"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read into the given state (missing, corrupt, other settings
    or structure, non-finite values) or written (a non-finite state, a step already saved)."""


# --- names and checks ------------------------------------------------------------------------


def _key_name(key: Any) -> str:
    """One step of a pytree path as orbax names it (dict key, sequence index or attribute)."""
    for field in ("key", "idx", "name"):
        if hasattr(key, field):
            return str(getattr(key, field))
    return str(key)


def _leaves(tree: Any) -> list[tuple[tuple[str, ...], str, Any]]:
    """(orbax path, jax.tree_util.keystr name, leaf) for every leaf of `tree`."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(_key_name(k) for k in path), jax.tree_util.keystr(path), leaf) for path, leaf in flat]


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    """[len(leaves)] bool: whether each array is free of NaN and inf."""
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def first_nonfinite(tree: Any) -> str | None:
    """The name (keystr path) of the first floating-point leaf of `tree` holding a NaN or inf, or None.

    One device computation and one transfer for the whole tree.
    """
    named = [(name, leaf) for _, name, leaf in _leaves(tree) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    if not named:
        return None
    bad = np.flatnonzero(~host_value(_finite_flags([leaf for _, leaf in named])))
    return named[bad[0]][0] if bad.size else None


def _flatten_settings(settings: Any, prefix: str = "") -> dict[str, Any]:
    """{"model.width": 32, ...}: a nested dict of JSON values as dotted keys."""
    if not isinstance(settings, dict) or not settings:
        return {prefix: settings}
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        flat.update(_flatten_settings(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def settings_differences(saved: Any, given: Any, limit: int = 3) -> list[str]:
    """The first `limit` keys where two settings dicts differ, as "key: saved X, given Y" (JSON values
    compared after a JSON round trip, so a tuple equals its list)."""
    saved, given = (_flatten_settings(json.loads(json.dumps(s))) for s in (saved, given))
    keys = list(given) + [key for key in saved if key not in given]
    missing = "(absent)"
    return [
        f"{key or '(top)'}: saved {json.dumps(saved.get(key, missing))}, given {json.dumps(given.get(key, missing))}"
        for key in keys
        if saved.get(key, missing) != given.get(key, missing)
    ][:limit]


def _structure_problems(stored: Any, target: Any) -> list[str]:
    """Differences of array names, shapes and dtypes between orbax's stored tree metadata and `target`."""
    stored_leaves = {path: leaf for path, _, leaf in _leaves(stored)}
    target_leaves = _leaves(target)
    target_paths = {path for path, _, _ in target_leaves}
    problems = []
    missing = [name for path, name, _ in target_leaves if path not in stored_leaves]
    extra = [".".join(path) for path in stored_leaves if path not in target_paths]
    if missing:
        problems.append(f"missing {len(missing)} arrays, e.g. {', '.join(missing[:3])}")
    if extra:
        problems.append(f"{len(extra)} arrays the model does not have, e.g. {', '.join(extra[:3])}")
    for path, name, leaf in target_leaves:
        if path not in stored_leaves:
            continue
        value = stored_leaves[path]
        shape, dtype = tuple(np.shape(leaf)), np.dtype(jnp.result_type(leaf))
        stored_shape, stored_dtype = tuple(value.shape), np.dtype(value.dtype)
        if stored_shape != shape or stored_dtype != dtype:
            problems.append(f"{name}: stored {stored_dtype}{list(stored_shape)}, expected {dtype}{list(shape)}")
    return problems


# --- the folder --------------------------------------------------------------------------------


def _manager(path: Path, *, keep: int | None = None, create: bool = False) -> ocp.CheckpointManager:
    """An orbax manager of the folder `path` (synchronous; `create` for saving, which also removes
    the temporary folder of a save killed midway)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=False, create=create, cleanup_tmp_directories=create
    )
    handlers = {STATE: ocp.StandardCheckpointHandler(), METADATA: ocp.JsonCheckpointHandler()}
    # orbax's tensorstore writer refuses relative folders ("Checkpoint path should be absolute"),
    # and `attnlab run --out results` gives one.
    return ocp.CheckpointManager(path.absolute(), options=options, item_handlers=handlers)


def _steps(path: Path) -> list[int]:
    """The steps of the finished checkpoints in `path`, oldest first ([] when it does not exist)."""
    if not path.exists():
        return []
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint folder {str(path)!r} is a file, not a folder (an old .npz checkpoint?); "
            "delete it to train anew"
        )
    # Listing the finished step folders, not opening a CheckpointManager: opening one is a
    # barrier of every process, and whether the folder exists yet differs between processes.
    return sorted(ocp.utils.checkpoint_steps(path))


def latest_step(path: str | Path) -> int | None:
    """The newest finished step saved in the folder `path`; None when it holds none or does not exist."""
    steps = _steps(Path(path))
    return steps[-1] if steps else None


def _advice(path: Path, step: int, steps: list[int]) -> str:
    """What to do about a bad step folder: delete it (resuming from the step before) or the whole folder."""
    earlier = [s for s in steps if s < step]
    if earlier:
        return f"delete {str(path / str(step))!r} to resume from step {earlier[-1]}, or {str(path)!r} to train anew"
    return f"delete the folder {str(path)!r} to train anew"


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def save(
    path: str | Path, state: Any, metadata: dict[str, Any] | None = None, *, step: int | None = None, keep: int = 2
) -> Path:
    """Save `state` (a pytree of arrays) and `metadata` (JSON values) as step `step` of the folder `path`.

    step defaults to `state.step` (a `TrainState`'s completed steps). The write is synchronous and
    atomic; afterwards only the newest `keep` steps remain. Returns the folder `path`.
    Raises CheckpointError for a state holding NaN or inf (never saved) or a step already saved.
    """
    path = Path(path)
    if step is None:
        if not hasattr(state, "step"):
            raise ValueError(f"checkpoint.save: give step= for a state without a .step field; got {type(state)}")
        step = int(host_value(state.step))
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(f"not saving step {step} to {str(path)!r}: {bad} holds NaN or inf")
    steps = _steps(path)
    if step in steps:
        raise CheckpointError(
            f"checkpoint folder {str(path)!r} already holds step {step}; "
            f"delete {str(path / str(step))!r} to save it again"
        )
    items = {STATE: ocp.args.StandardSave(state), METADATA: ocp.args.JsonSave(dict(metadata or {}))}
    with _quiet():
        manager = _manager(path, keep=keep, create=True)
        try:
            manager.save(step, args=ocp.args.Composite(**items))
            manager.wait_until_finished()
        finally:
            manager.close()
    return path


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep orbax's noise off the screen: its absl warnings about routine reads (e.g. one item read
    of two), and the tracebacks its abandoned coroutines print when collected after a failed read
    (the failure itself still surfaces, as a CheckpointError)."""
    absl = logging.getLogger("absl")
    level, hook = absl.level, sys.unraisablehook
    absl.setLevel(logging.ERROR)
    sys.unraisablehook = lambda _: None
    try:
        yield
    finally:
        absl.setLevel(level)
        sys.unraisablehook = hook


def _read(path: Path, step: int | None, read: Any) -> tuple[int, Any]:
    """(step, read(manager, step)) for the newest step (or `step`), any orbax failure a CheckpointError."""
    steps = _steps(path)
    if not steps:
        what = "does not exist" if not path.exists() else "holds no finished checkpoint"
        raise CheckpointError(
            f"checkpoint folder {str(path)!r} {what}; train with checkpoint={str(path)!r} to make one"
        )
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(f"checkpoint folder {str(path)!r} has no step {step}; it holds steps {steps}")
    with _quiet():
        manager = _manager(path)
        try:
            return step, read(manager, step)
        except CheckpointError:
            raise
        except Exception as error:  # orbax, tensorstore and json raise many types for a damaged folder
            failure = _one_line(error)
        finally:
            manager.close()
        gc.collect()  # now, while quiet: the failed read's coroutines print tracebacks when collected
    raise CheckpointError(
        f"checkpoint {str(path / str(step))!r} is corrupt or unreadable ({failure}); {_advice(path, step, steps)}"
    )


def _read_metadata(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    metadata = manager.restore(step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))[METADATA]
    if not isinstance(metadata, dict):
        raise ValueError(f"the metadata is a {type(metadata).__name__}, not a JSON object")
    return metadata


def read_metadata(path: str | Path, *, step: int | None = None) -> dict[str, Any]:
    """The metadata saved with the newest step (or `step`) of the folder `path`."""
    return _read(Path(path), step, _read_metadata)[1]


def restore(
    path: str | Path, target: Any, *, step: int | None = None, settings: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    """(state, metadata): the newest step (or `step`) of the folder `path` in the structure of `target`.

    Each leaf is placed on the target leaf's sharding (any mesh). CheckpointError (one line) when
    the folder is missing or unreadable; when `settings` is given and differs from the saved
    metadata["settings"]; when an array of target is missing, has another shape or dtype, or the
    checkpoint holds arrays target has not; and when a restored array holds NaN or inf.
    """
    path = Path(path)

    def read(manager: ocp.CheckpointManager, at: int) -> tuple[Any, dict[str, Any]]:
        metadata = _read_metadata(manager, at)
        if settings is not None and "settings" in metadata:
            differences = settings_differences(metadata["settings"], settings)
            if differences:
                raise CheckpointError(
                    f"checkpoint folder {str(path)!r} was saved with other settings ({'; '.join(differences)}): "
                    "a folder keyed by its settings was reused or edited; delete it to train anew"
                )
        stored = manager.item_metadata(at)[STATE]
        if not _leaves(stored):
            raise ValueError("its state holds no arrays")
        problems = _structure_problems(stored, target)
        if problems:
            raise CheckpointError(
                f"checkpoint {str(path / str(at))!r} does not match the model: {'; '.join(problems)}; "
                "delete the folder to train this model anew"
            )
        abstract = jax.tree.map(_abstract, target)
        state = manager.restore(at, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract)}))[STATE]
        return state, metadata

    step, (state, metadata) = _read(path, step, read)
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {str(path / str(step))!r} holds NaN or inf in {bad}; {_advice(path, step, _steps(path))}"
        )
    return state, metadata


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    """The shape, dtype and sharding a restored leaf takes (default: the first local device)."""
    sharding = getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf), sharding=sharding)
