"""Diffusion planner: JAX vs the PyTorch reference (tests/torch_ref/planner.py), same config and batch, one process.

    python bench/planner.py [--config small] [--batch 16] [--vl-len 64] [--steps 2] [--threads 1]

Prints ratios (> 1 = JAX faster):
    planner_train_step_jax_vs_torch: 1.8x      IL train step (eps loss, AdamW, grad clip 1.0), steps/s
    planner_ddim5_b1_jax_vs_torch: ...x        5-step DDIM (get_action: encode + 5 denoising steps), latency
    planner_ddim5_b64_jax_vs_torch: ...x
Upstream runs L = 2800 VL tokens; the CPU default uses a short sequence to stay under ~2 minutes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="small")
    p.add_argument("--vlm-size", default="large", choices=["large", "small"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vl-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="timed repetitions of each measurement")
    p.add_argument("--dtype", default="float32", help="JAX compute dtype (torch runs fp32)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for both frameworks (1 = single-threaded XLA and torch; fair and stable on a "
                        "shared machine, where torch's OpenMP threads degrade badly under contention); 0 = defaults")
    return p.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads == 1:  # must happen before jax initialises its CPU client
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from recogdrive_jax.convert.planner import torch_state_dict_to_params  # noqa: E402
from recogdrive_jax.models.planner import build_planner, load_planner_params, planner_config  # noqa: E402
from bench.common import time_call  # noqa: E402
from torch_ref.planner import TorchPlanner, lightning_state_dict, normalize  # noqa: E402




def main(args) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = planner_config(args.config, vlm_size=args.vlm_size, dtype=args.dtype)
    print(f"# planner bench: {args.config} (D={cfg.embed_dim}, layers={cfg.num_layers}, Hv={cfg.vl_dim}), "
          f"batch {args.batch}, L {args.vl_len}, {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}")

    tm = TorchPlanner(vl_dim=cfg.vl_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                      output_dim=cfg.output_dim, mlp_hidden=cfg.mlp_hidden)
    jm = build_planner(cfg, nnx.Rngs(0))
    load_planner_params(jm, torch_state_dict_to_params(lightning_state_dict(tm), cfg, verbose=False))

    g = np.random.default_rng(0)

    def make(b):
        return (g.normal(size=(b, args.vl_len, cfg.vl_dim)).astype(np.float32),
                g.normal(size=(b, 8)).astype(np.float32), g.normal(size=(b, 4, 3)).astype(np.float32),
                (g.normal(size=(b, 8, 3)) * [10, 2, 0.2] + [15, 0, 0]).astype(np.float32))

    vl, st, his, fut = make(args.batch)
    batch = {"cond": {"vl_states": jnp.asarray(vl), "status": jnp.asarray(st), "history": jnp.asarray(his)},
             "future": jnp.asarray(fut)}

    # --- train step --------------------------------------------------------------------------------------------
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4))
    opt = nnx.Optimizer(jm, tx, wrt=nnx.Param)

    @nnx.jit
    def jax_step(m, opt, batch, rng):
        loss, grads = nnx.value_and_grad(lambda m: m.loss(batch, rng)[0])(m)
        opt.update(m, grads)
        return loss

    keys = iter(jax.random.split(jax.random.key(1), 10_000))
    t0 = time.perf_counter()
    jax_step(jm, opt, batch, next(keys)).block_until_ready()
    jax_compile = time.perf_counter() - t0
    jt = time_call(lambda: jax_step(jm, opt, batch, next(keys)).block_until_ready(), args.steps)

    topt = torch.optim.AdamW(tm.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4)
    tvl, tst, this, tfut = (torch.from_numpy(a) for a in (vl, st, his, fut))

    def torch_step():
        ctx = tm.encode(tvl, this, tst)
        x0 = normalize(tfut)
        t = torch.randint(0, 100, (args.batch,))
        loss = tm.loss(x0, t, torch.randn_like(x0), ctx)
        topt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        topt.step()

    tt = time_call(torch_step, args.steps)
    print(f"# train step: jax {1 / jt:.2f} steps/s (compile {jax_compile:.1f}s), torch {1 / tt:.2f} steps/s")
    print(f"planner_train_step_jax_vs_torch: {tt / jt:.2f}x")

    # --- DDIM 5-step latency -----------------------------------------------------------------------------------
    sample = nnx.jit(lambda m, c, r: m.sample(c, r, deterministic=False))
    for b in (1, 64):
        vl_b, st_b, his_b, _ = make(b)
        cond = {"vl_states": jnp.asarray(vl_b), "status": jnp.asarray(st_b), "history": jnp.asarray(his_b)}
        jl = time_call(lambda: sample(jm, cond, next(keys)).block_until_ready(), args.steps)
        tvl_b, tst_b, this_b = (torch.from_numpy(a) for a in (vl_b, st_b, his_b))

        def torch_sample():
            with torch.no_grad():
                ctx = tm.encode(tvl_b, this_b, tst_b)
                x = torch.randn(b, 8, 3)
                tm.sample_chain(ctx, x, torch.randn(5, b, 8, 3), min_std=1e-4, noise_clip=1.0)

        tl = time_call(torch_sample, args.steps)
        print(f"# ddim5 batch {b}: jax {jl * 1e3:.1f} ms, torch {tl * 1e3:.1f} ms")
        print(f"planner_ddim5_b{b}_jax_vs_torch: {tl / jl:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(ARGS))
