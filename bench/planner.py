"""Diffusion planner: JAX vs the PyTorch planner, same weights, batch and precision, interleaved in one process.

    python bench/planner.py                      # anchor shapes: DiT small, batch 16, vl_len 256 and 2800
    python bench/planner.py --vl-lens 256 --reps 5 --threads 1

Baseline: `tests/torch_ref/planner.py`, proven equal to the upstream ReCogDrive planner (its own Lightning checkpoint,
IL forward, DDIM, chain log-probs to 1e-5) by tests/test_torch_ref_vs_upstream.py. Method: bench/common.py
(ABAB repeats, min/median, compile apart, others' CPU share; single-threaded both sides by default).
Prints (> 1 = JAX faster, min over repeats):
    planner_train_step_L256: 1.80x          IL train step (eps loss, AdamW, grad clip 1.0), batch 16
    planner_train_step_L2800: ...x          upstream's real VLM input length (~2,800 tokens)
    planner_ddim5_b1: ...x / planner_ddim5_b64: ...x   5-step DDIM `get_action` latency (vl_len 256)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench import common  # noqa: E402


def _parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="small")
    p.add_argument("--vlm-size", default="large", choices=["large", "small"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vl-lens", default="256,2800", help="comma list of VLM token counts (anchors: 256, 2800)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repeats per side (>= 5)")
    p.add_argument("--dtype", default="float32", help="JAX compute dtype (torch runs fp32)")
    p.add_argument("--no-ddim", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="1 = single-threaded XLA and torch (recordable); 0 = defaults")
    return p.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads == 1:
    common.single_thread()  # before jax and torch initialise

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from recogdrive_jax.convert.planner import torch_state_dict_to_params  # noqa: E402
from recogdrive_jax.models.planner import build_planner, load_planner_params, planner_config  # noqa: E402
from torch_ref.planner import TorchPlanner, lightning_state_dict, normalize  # noqa: E402


def main(args) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = planner_config(args.config, vlm_size=args.vlm_size, dtype=args.dtype)
    print(f"# planner bench: {args.config} (D={cfg.embed_dim}, layers={cfg.num_layers}, Hv={cfg.vl_dim}), "
          f"batch {args.batch}, vl_len {args.vl_lens}, {jax.devices()[0].platform}, torch threads "
          f"{torch.get_num_threads()}, {common.load_average()}")

    tm = TorchPlanner(vl_dim=cfg.vl_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                      output_dim=cfg.output_dim, mlp_hidden=cfg.mlp_hidden)
    jm = build_planner(cfg, nnx.Rngs(0))
    load_planner_params(jm, torch_state_dict_to_params(lightning_state_dict(tm), cfg, verbose=False))
    g = np.random.default_rng(0)

    def make(b, n):
        return (g.normal(size=(b, n, cfg.vl_dim)).astype(np.float32),
                g.normal(size=(b, 8)).astype(np.float32), g.normal(size=(b, 4, 3)).astype(np.float32),
                (g.normal(size=(b, 8, 3)) * [10, 2, 0.2] + [15, 0, 0]).astype(np.float32))

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4))
    opt = nnx.Optimizer(jm, tx, wrt=nnx.Param)
    topt = torch.optim.AdamW(tm.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4)
    keys = iter(jax.random.split(jax.random.key(1), 100_000))

    @nnx.jit
    def jax_step(m, opt, batch, rng):
        loss, grads = nnx.value_and_grad(lambda m: m.loss(batch, rng)[0])(m)
        opt.update(m, grads)
        return loss

    timings = []
    for n in (int(x) for x in args.vl_lens.split(",") if x):
        vl, st, his, fut = make(args.batch, n)
        batch = {"cond": {"vl_states": jnp.asarray(vl), "status": jnp.asarray(st), "history": jnp.asarray(his)},
                 "future": jnp.asarray(fut)}
        tvl, tst, this, tfut = (torch.from_numpy(a) for a in (vl, st, his, fut))

        def torch_step():
            ctx = tm.encode(tvl, this, tst)
            x0 = normalize(tfut)
            loss = tm.loss(x0, torch.randint(0, 100, (args.batch,)), torch.randn_like(x0), ctx)
            topt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
            topt.step()

        t = common.interleaved(f"planner_train_step_L{n}", torch_step,
                               lambda: jax_step(jm, opt, batch, next(keys)).block_until_ready(), reps=args.reps)
        t.print()
        timings.append(t)

    if not args.no_ddim:
        n = int(args.vl_lens.split(",")[0])
        sample = nnx.jit(lambda m, c, r: m.sample(c, r, deterministic=False))
        for b in (1, 64):
            vl_b, st_b, his_b, _ = make(b, n)
            cond = {"vl_states": jnp.asarray(vl_b), "status": jnp.asarray(st_b), "history": jnp.asarray(his_b)}
            tvl_b, tst_b, this_b = (torch.from_numpy(a) for a in (vl_b, st_b, his_b))

            def torch_sample():
                with torch.no_grad():
                    ctx = tm.encode(tvl_b, this_b, tst_b)
                    tm.sample_chain(ctx, torch.randn(b, 8, 3), torch.randn(5, b, 8, 3), min_std=1e-4, noise_clip=1.0)

            t = common.interleaved(f"planner_ddim5_b{b}", torch_sample,
                                   lambda: sample(jm, cond, next(keys)).block_until_ready(), reps=args.reps)
            t.print()
            timings.append(t)
    row = common.results_line(timings, "python bench/planner.py", "DATE", f"{jax.devices()[0].platform}")
    if row:
        print("# RESULTS.md row:\n" + row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(ARGS))
