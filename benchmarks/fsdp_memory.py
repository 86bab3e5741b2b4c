"""Per-device memory of the training state under FSDP and tensor parallelism (issue 20's numbers).

A `TransformerLM` (default 4 layers, width 512, 8 heads: 13.5 M parameters) and its AdamW state
placed on data x fsdp x tensor meshes of 8 forced CPU devices by `attnlab.train.step.state_shardings`:

    state_mib    the parameters and optimizer state one device holds (the most-loaded device)
    ideal_mib    the whole state divided by fsdp x tensor (what perfect sharding would give)
    step_mib     XLA's compiled memory analysis of one train step on one device (arguments,
                 outputs and temporaries; batch 8 x 128 tokens)

    python benchmarks/fsdp_memory.py [--layers 4] [--width 512] [--heads 8]

The devices are forced CPU devices (XLA_FLAGS, set here before jax is imported): the memory is
what each device would hold on real accelerators; nothing here is timed.
"""

from __future__ import annotations

import os

DEVICES = 8
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from attnlab.data.batch import Batch  # noqa: E402
from attnlab.nn import ModelConfig, TransformerLM  # noqa: E402
from attnlab.train import OptimizerConfig, make_mesh, make_optimizer, shard_batch, split_model  # noqa: E402
from attnlab.train.mesh import MeshConfig  # noqa: E402
from attnlab.train.sharding import device_bytes  # noqa: E402
from attnlab.train.step import init_state, make_train_step  # noqa: E402

MESHES = {
    "1 device": MeshConfig(data=1),
    "data 8": MeshConfig(data=8),
    "fsdp 2": MeshConfig(data=1, fsdp=2),
    "fsdp 4": MeshConfig(data=1, fsdp=4),
    "fsdp 8": MeshConfig(data=1, fsdp=8),
    "tensor 8": MeshConfig(data=1, tensor=8),
    "2 x 2 x 2": MeshConfig(data=2, fsdp=2, tensor=2),
}
MIB = 2**20


def measure(model_config: ModelConfig, mesh_config: MeshConfig, batch: Batch) -> dict[str, float]:
    mesh = make_mesh(mesh_config, batch_size=batch.inputs.shape[0])
    split, params = split_model(TransformerLM(model_config, rngs=nnx.Rngs(0)))
    optimizer = make_optimizer(OptimizerConfig(), 100, params)
    state, shardings = init_state(optimizer, params, mesh)
    step = make_train_step(split, optimizer, mesh, None, None, shardings)
    analysis = step.lower(state, shard_batch(batch, mesh)).compile().memory_analysis()
    step_bytes = analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
    step_bytes -= analysis.alias_size_in_bytes  # the donated state is both argument and output
    whole = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
    held = max(device_bytes((state.params, state.opt_state), d) for d in mesh.devices.flat)
    return {
        "state_mib": held / MIB,
        "ideal_mib": whole / MIB / (mesh_config.fsdp * mesh_config.tensor),
        "step_mib": step_bytes / MIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    args = parser.parse_args()
    model_config = ModelConfig(num_layers=args.layers, width=args.width, num_heads=args.heads)
    tokens = np.random.default_rng(0).integers(0, 256, size=(8, 129)).astype(np.int32)
    batch = Batch(tokens[:, :-1], tokens[:, 1:], np.ones((8, 128), bool))
    parameters = TransformerLM(model_config, rngs=nnx.Rngs(0)).num_params()
    print(f"{args.layers} layers, width {args.width}, {args.heads} heads: {parameters / 1e6:.1f} M parameters, "
          f"AdamW; {jax.device_count()} forced CPU devices")  # fmt: skip
    print(f"{'mesh':<12}{'state MiB':>11}{'ideal MiB':>11}{'step MiB':>10}")
    for name, mesh_config in MESHES.items():
        row = measure(model_config, mesh_config, batch)
        print(f"{name:<12}{row['state_mib']:>11.1f}{row['ideal_mib']:>11.1f}{row['step_mib']:>10.1f}")


if __name__ == "__main__":
    main()
