"""A test-only task for the generic loop: a two-layer NNX MLP regressing a fixed random linear map.

Run as a script it trains through `train.loop.train`, which lets tests kill it, resume it, and run it as
several `jax.distributed` processes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


class ToyIterator:
    """Deterministic, checkpointable batches; each JAX process reads its own rows of every global batch."""

    def __init__(self, global_batch: int, dim: int = 16, seed: int = 0, process_index: int = 0,
                 process_count: int = 1):
        self.global_batch, self.dim, self.seed = global_batch, dim, seed
        self.pi, self.pc = process_index, process_count
        self.w = np.random.default_rng(1234).normal(size=(dim, 4)).astype(np.float32)
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.position])
        x = rng.normal(size=(self.global_batch, self.dim)).astype(np.float32)
        y = np.tanh(x @ self.w)
        self.position += 1
        rows = slice(self.pi * self.global_batch // self.pc, (self.pi + 1) * self.global_batch // self.pc)
        return {"x": x[rows], "y": y[rows]}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = int(state["position"])


def make_task(config, process_index=0, process_count=1, noise=0.01):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import recogdrive_jax  # noqa: F401  (flax config)
    from recogdrive_jax.parallel import sharding as sh
    from recogdrive_jax.train.loop import Task

    dim, hidden = 16, 1024

    class Mlp(nnx.Module):
        def __init__(self, rngs):
            init = nnx.initializers.lecun_normal()
            self.fc1 = nnx.Linear(dim, hidden, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                                  rngs=rngs)
            self.fc2 = nnx.Linear(hidden, 4, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")),
                                  rngs=rngs)

        def __call__(self, x):
            return self.fc2(jax.nn.gelu(self.fc1(x)))

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Mlp(nnx.Rngs(0))))
    logical = sh.logical_specs(state)

    def init_params(rng):
        return nnx.state(Mlp(nnx.Rngs(rng))).to_pure_dict()

    def loss_fn(params, batch, rng):
        st = nnx.State(jax.tree.map(lambda x: x, state))
        nnx.replace_by_pure_dict(st, params)
        model = nnx.merge(graphdef, st)
        err = model(batch["x"]) - batch["y"] - noise * jax.random.normal(rng, batch["y"].shape)
        loss = jnp.mean(err ** 2)
        return loss, {"mae": jnp.mean(jnp.abs(err))}

    it = ToyIterator(config.train.batch_size, dim, config.seed, process_index, process_count)
    return Task(name="toy", init_params=init_params, loss_fn=loss_fn, train_iter=it, logical=logical,
                ema_decay=float(config.get("ema_decay", 0.0)))


def toy_config(**overrides):
    from recogdrive_jax import configs
    c = configs.base_config()
    c.stage = "il"
    c.train.num_steps = 12
    c.train.batch_size = 16
    c.train.log_every = 1
    c.train.checkpoint_every = 4
    c.train.tensorboard = False
    c.optim.lr = 2e-3
    c.optim.warmup_ratio = 0.1
    c.optim.weight_decay = 0.01
    return configs.set_dotted(c, overrides)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--set", action="append", default=[], help="key=json_value")
    ap.add_argument("--sleep_after_checkpoint", type=float, default=0.0)
    args = ap.parse_args()
    overrides = {kv.split("=", 1)[0]: json.loads(kv.split("=", 1)[1]) for kv in args.set}
    config = toy_config(**overrides)
    from recogdrive_jax.parallel import mesh as mesh_lib
    mesh_lib.initialize_distributed(config.distributed)
    import jax
    from recogdrive_jax.train import loop
    task = make_task(config, jax.process_index(), jax.process_count())
    if args.sleep_after_checkpoint:
        # Slow every step down so the parent can kill us between checkpoints.
        import time
        orig_next = task.train_iter.__next__
        type(task.train_iter).__next__ = lambda self: (time.sleep(args.sleep_after_checkpoint), orig_next())[1]
    state, _ = loop.train(config, args.workdir, task)
    print("FINAL_STEP", int(jax.device_get(state.step)), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
