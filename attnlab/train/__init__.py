"""Training: AdamW with a schedule, a jit-compiled step over a device mesh, evaluation, checkpoints.

- `OptimizerConfig`, `make_optimizer`: AdamW, warmup + constant/cosine, decay on matrices only,
  clipping; `OptimizerConfig.ssmax_paper(steps)` is the SSMax paper's recipe at small scale.
- `MeshConfig`, `make_mesh`, `shard_batch`: the data x fsdp x tensor device mesh, the batch split
  over data x fsdp (one device is the same code); `state_shardings` places parameters and
  optimizer state by logical axis (FSDP, tensor parallelism; see `attnlab.train.sharding`).
- `TrainConfig`, `train`: the loop, with a progress bar, metric history, checkpoints and resumption;
  the loss is the model's own (its output normalizer's) or any `Objective` (e.g. distillation);
  a NaN or inf loss or gradient norm stops it with `TrainingDiverged` (model, step, values).
- `distillation_loss`, `distillation_objective`: a student's loss against a frozen teacher's
  temperature-softened predictions (Hinton et al. 2015), and the `Objective` that trains on it.
- `evaluate`: mean and per-position loss, token and sequence accuracy, optionally with a raised
  RoPE base.
- `checkpoint.save` / `checkpoint.restore`: the training state in an orbax checkpoint folder (one
  atomic sub-folder per saved step, the last k kept), restorable onto any device mesh; a corrupt,
  mismatched or non-finite checkpoint is one `CheckpointError` line saying what to do.
"""

from attnlab.train import checkpoint
from attnlab.train.checkpoint import CheckpointError
from attnlab.train.distill import distillation_loss, distillation_objective
from attnlab.train.evaluate import EvalResult, evaluate
from attnlab.train.loop import TrainConfig, TrainingDiverged, TrainResult, train
from attnlab.train.mesh import DATA_AXIS, FSDP_AXIS, TENSOR_AXIS, MeshConfig, make_mesh, shard_batch
from attnlab.train.optimizer import PRESETS, OptimizerConfig, decay_mask, learning_rate_schedule, make_optimizer
from attnlab.train.step import (
    Objective,
    TrainState,
    make_eval_step,
    make_train_step,
    model_objective,
    split_model,
    state_shardings,
)

__all__ = [
    "DATA_AXIS",
    "FSDP_AXIS",
    "PRESETS",
    "TENSOR_AXIS",
    "CheckpointError",
    "EvalResult",
    "MeshConfig",
    "Objective",
    "OptimizerConfig",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "TrainingDiverged",
    "checkpoint",
    "decay_mask",
    "distillation_loss",
    "distillation_objective",
    "evaluate",
    "learning_rate_schedule",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "model_objective",
    "shard_batch",
    "split_model",
    "state_shardings",
    "train",
]
