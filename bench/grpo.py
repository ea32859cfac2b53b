"""DiffGRPO step throughput: the jitted JAX step vs the upstream shape of the computation, same planner, interleaved.

    python bench/grpo.py                 # DiT small, 4 scenes x G 8, vl_len 32
    python bench/grpo.py --quick         # tiny planner, 2 scenes x G 4, vl_len 8: the smoke path (tests)
    python bench/grpo.py --profile       # instead of timing: FLOPs and CPU time of each part of the step, both sides

JAX: `rl/grpo.py` — G chains per scene, the vectorised PDM reward (`sim/pdm.py`), advantages, log-probs, BC on the
reference's chains and the AdamW update, all in one jit.
Upstream shape: PyTorch `sample_chain` on the repeated batch with the reference planner (tests/torch_ref/planner.py),
a per-trajectory Python PDM scorer (tests/pdm_reference.py: NAVSIM-style loops, one reference simulation per
scene), group advantages in torch, `get_logprobs` + BC, backward, clip 1.0, AdamW.
Method: bench/common.py (ABAB repeats, ≥ 5, min/median, JAX compile apart, single-threaded both sides by default,
the quiet gate on the RESULTS row). Prints scenes/s of both and `grpo_step_jax_vs_torch: <ratio>x` (> 1 = JAX
faster; min over repeats).
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

from bench import common  # noqa: E402


def _parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="small", help="planner variant (small = upstream DiT)")
    p.add_argument("--vlm-size", default="large", choices=["large", "small"])
    p.add_argument("--batch", type=int, default=4, help="scenes per step")
    p.add_argument("--group", type=int, default=8, help="G chains per scene")
    p.add_argument("--vl-len", type=int, default=32, help="VL tokens (upstream 2800; short on CPU)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repeats per side (>= 5)")
    p.add_argument("--quick", action="store_true",
                   help="tiny planner, 2 scenes x G 4, vl_len 8: a smoke run, not a figure")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for both frameworks (1 = single-threaded XLA and torch: fair and stable on a "
                        "shared machine); 0 = defaults")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: the JAX step's parts (G-chain sampling, reference chain, PDM reward, loss "
                        "value_and_grad, optimizer) jitted apart, each with its GFLOP (dots of the compiled HLO x loop "
                        "trip counts) and process CPU time, and torch's FLOPs (FlopCounterMode) and part times")
    a = p.parse_args(argv)
    if a.quick:
        a.config, a.batch, a.group, a.vl_len = "tiny", 2, 4, 8
    return a


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads == 1:
    common.single_thread()  # before jax and torch initialise

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import pdm_reference  # noqa: E402
from recogdrive_jax import configs  # noqa: E402
from recogdrive_jax.convert.planner import torch_state_dict_to_params  # noqa: E402
from recogdrive_jax.models.planner import build_planner, planner_config  # noqa: E402
from recogdrive_jax.rl import grpo  # noqa: E402
from recogdrive_jax.sim import world  # noqa: E402
from recogdrive_jax.train import optim  # noqa: E402
from recogdrive_jax.train.module_def import ModuleDef  # noqa: E402
from recogdrive_jax.train.state import init_train_state  # noqa: E402
from torch_ref.planner import TorchPlanner, denormalize, lightning_state_dict  # noqa: E402




class TorchGRPO:
    """Upstream's ReinforceAlgorithm step (recogdrive_rl_algo.py), written from spec/planner.md §4."""

    def __init__(self, tm: TorchPlanner, ref: TorchPlanner, scenes, rl: grpo.GRPOConfig, seed: int = 0):
        self.tm, self.ref, self.scenes, self.rl = tm, ref, scenes, rl
        self.opt = torch.optim.AdamW(tm.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)
        self.w = torch.tensor(grpo.discount_weights(tm.K, rl.gamma))
        self.gen = torch.Generator().manual_seed(seed)
        self.timing = {"sample": 0.0, "score": 0.0, "update": 0.0}

    def step(self, vl, his, st):
        g, b, k = self.rl.group_size, vl.shape[0], self.tm.K
        t0 = time.perf_counter()
        rep = lambda x: x.repeat_interleave(g, dim=0)  # noqa: E731
        with torch.no_grad():
            ctx = self.tm.encode(rep(vl), rep(his), rep(st))
            n = b * g
            chain = self.tm.sample_chain(ctx, torch.randn(n, 8, 3, generator=self.gen),
                                         torch.randn(k, n, 8, 3, generator=self.gen))
            ref_ctx = self.ref.encode(vl, his, st)
            ref_chain = self.ref.sample_chain(ref_ctx, torch.randn(b, 8, 3, generator=self.gen),
                                              torch.randn(k, b, 8, 3, generator=self.gen))
        traj = denormalize(chain[:, -1]).numpy().astype(np.float64)
        t1 = time.perf_counter()
        rewards = []
        for i in range(b):  # per scene: one reference simulation, then a Python loop over its trajectories
            try:
                res = pdm_reference.score_many(self.scenes[i], traj[i * g:(i + 1) * g], ep_weight=self.rl.ep_weight,
                                               ttc_weight=self.rl.ttc_weight, comfort_weight=self.rl.comfort_weight)
                rewards.extend(r["pdms"] for r in res)
            except Exception:  # upstream: reward 0 when scoring fails
                rewards.extend([0.0] * g)
        t2 = time.perf_counter()
        r = torch.tensor(rewards, dtype=torch.float32).view(b, g)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-8)).view(-1)
        ctx = self.tm.encode(rep(vl), rep(his), rep(st))
        lp = self.tm.get_logprobs(ctx, chain).clamp(-5, 2).mean((-2, -1)).view(b * g, k)
        pg = -(lp * adv[:, None] * self.w[None]).mean()
        bc_lp = self.tm.get_logprobs(self.tm.encode(vl, his, st), ref_chain).clamp(-5, 2)
        loss = pg + self.rl.bc_weight * (-bc_lp.mean())
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.tm.parameters(), 1.0)
        self.opt.step()
        t3 = time.perf_counter()
        for key, dt in (("sample", t1 - t0), ("score", t2 - t1), ("update", t3 - t2)):
            self.timing[key] += dt
        return float(loss.detach())


def main(args) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = planner_config(args.config, vlm_size=args.vlm_size)
    b, g = args.batch, args.group
    rl = grpo.GRPOConfig(group_size=g)
    print(f"# grpo bench: {args.config} (D={cfg.embed_dim}, layers={cfg.num_layers}, Hv={cfg.vl_dim}), {b} scenes x "
          f"G={g}, L {args.vl_len}, {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}, "
          f"{common.load_average()}")
    scenes = world.generate_scenes(b, seed=123)
    batch_scene = world.stack_scenes(scenes)
    batch_scene = world.Scene(**{k: (v.astype(np.int32) if v.dtype == np.int64 else v)
                                 for k, v in vars(batch_scene).items()})
    rng = np.random.default_rng(0)
    vl = rng.normal(size=(b, args.vl_len, cfg.vl_dim)).astype(np.float32)
    his, st = batch_scene.history.astype(np.float32), batch_scene.status.astype(np.float32)

    torch.manual_seed(0)
    tm = TorchPlanner(vl_dim=cfg.vl_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                      output_dim=cfg.output_dim, mlp_hidden=cfg.mlp_hidden)
    ref = TorchPlanner(vl_dim=cfg.vl_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                       output_dim=cfg.output_dim, mlp_hidden=cfg.mlp_hidden)
    ref.load_state_dict(tm.state_dict())
    for p in ref.parameters():
        p.requires_grad_(False)
    params = torch_state_dict_to_params(lightning_state_dict(tm), cfg, verbose=False)
    mdef = ModuleDef(lambda r: build_planner(cfg, r))
    params = jax.tree.map(jnp.asarray, _as_pure(mdef, params))

    ocfg = configs.planner_stage_config("rl").optim
    ocfg.update(dict(lr=1e-4, weight_decay=1e-4, b1=0.9, b2=0.95, clip_norm=1.0, min_lr_ratio=0.0))
    tx = optim.make_optimizer(ocfg, 1000, params)
    update = jax.jit(grpo.make_update(mdef.bind, rl, tx, num_denoise_steps=cfg.num_inference_steps),
                     donate_argnums=(0,))
    batch = {"cond": {"vl_states": jnp.asarray(vl), "status": jnp.asarray(st), "history": jnp.asarray(his)},
             "scene": jax.tree.map(jnp.asarray, batch_scene)}
    ref_params = jax.tree.map(jnp.copy, params)  # the frozen reference (the state's params are donated)
    holder = {"state": init_train_state(params, tx), "i": 0}

    def jax_step():
        holder["i"] += 1
        holder["state"], m = update(holder["state"], batch, jax.random.key(holder["i"]), ref_params)
        jax.block_until_ready(m)

    algo = TorchGRPO(tm, ref, scenes, rl)
    tvl, this, tst = torch.from_numpy(vl), torch.from_numpy(his), torch.from_numpy(st)
    if args.profile:
        profile(args, mdef, rl, tx, params, ref_params, batch, algo, (tvl, this, tst))
        return 0
    t = common.interleaved("grpo_step_jax_vs_torch", lambda: algo.step(tvl, this, tst), jax_step, reps=args.reps)
    t.print()
    n_calls = args.reps + 1  # + the warm-up call
    share = {k: v / n_calls for k, v in algo.timing.items()}
    print(f"# scenes/s (min time): jax {b / min(t.jax_s):.2f}  torch+python scorer {b / min(t.baseline_s):.2f} "
          f"(torch step means: sample {share['sample']:.3f} s, score {share['score']:.3f} s, update "
          f"{share['update']:.3f} s)")
    if not args.quick:
        common.print_results_row([t], "python bench/grpo.py")
    return 0


def profile(args, mdef, rl, tx, params, ref_params, batch, algo, tin) -> None:
    """Where the step's time goes: each part of the JAX step jitted on its own (GFLOP of its compiled HLO's dots x
    while-loop trip counts, CPU ms) next to the whole step, and torch's FLOPs and part times."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.planner import hlo_dots
    cond, scene, g = batch["cond"], batch["scene"], rl.group_size
    weights = jnp.asarray(grpo.discount_weights(5, rl.gamma))
    reward_fn = grpo.pdm_reward_fn(rl)
    key = jax.random.key(0)
    ro = jax.jit(lambda p, k: grpo.rollout(p, ref_params, mdef.bind, cond, scene, k, rl, reward_fn))(params, key)
    state = init_train_state(params, tx)
    grads = jax.tree.map(jnp.ones_like, params)

    def sample(p, k):
        pl = grpo.shared_memory_planner(mdef.bind, p)
        return grpo.group_sample(pl, pl.encode(cond), k, g)

    def sample_ref(p, k):
        pl = grpo.shared_memory_planner(mdef.bind, p)
        return pl.sample_with_chain(None, k, ctx=pl.encode(cond))

    def loss_grad(p):
        return jax.value_and_grad(grpo.reinforce_loss, has_aux=True)(
            p, mdef.bind, cond, ro["chain"], ro["adv"].reshape(-1), ro["valid"].reshape(-1), ro["ref_chain"], rl,
            weights)

    def pg_fwd(p):
        pl = grpo.shared_memory_planner(mdef.bind, p)
        return grpo.group_log_prob(pl, ro["chain"], pl.encode(cond))

    parts = [("whole step", grpo.make_update(mdef.bind, rl, tx, num_denoise_steps=5), (state, batch, key, ref_params)),
             ("sample G chains (encode + 5 DDIM steps)", sample, (params, key)),
             ("reference chain (frozen planner)", sample_ref, (ref_params, key)),
             ("PDM reward", lambda t: reward_fn(scene, t), (ro["trajectory"],)),
             ("loss value_and_grad (log-probs of the G chains + BC)", loss_grad, (params,)),
             ("... G chains' log-probs, forward only", pg_fwd, (params,)),
             ("optimizer (clip + AdamW)", lambda s, gr: grpo._apply(s, gr, tx), (state, grads))]
    print("# JAX part | GFLOP (dots) | CPU ms (min) | GFLOP/s")
    for name, fn, fargs in parts:
        c = jax.jit(fn).lower(*fargs).compile()
        fl = sum((d["flops"] or 0) * d["mult"] for d in hlo_dots(c.as_text())) / 1e9
        ms = 1e3 * common.cpu_min(lambda: jax.block_until_ready(c(*fargs)), args.reps)
        print(f"#   {name} | {fl:.2f} | {ms:.0f} | {fl / ms * 1e3:.0f}", flush=True)
    tm, b, k = algo.tm, tin[0].shape[0], algo.tm.K
    rep = lambda x: x.repeat_interleave(g, dim=0)  # noqa: E731
    with FlopCounterMode(display=False) as fc:
        algo.step(*tin)
    total = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        ctx = tm.encode(*(rep(x) for x in (tin[0], tin[1], tin[2])))
        tm.sample_chain(ctx, torch.randn(b * g, 8, 3), torch.randn(k, b * g, 8, 3))
    sample_fl = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        algo.ref.sample_chain(algo.ref.encode(*tin), torch.randn(b, 8, 3), torch.randn(k, b, 8, 3))
    ref_fl = fc.get_total_flops()
    algo.timing = {key: 0.0 for key in algo.timing}
    step_ms = 1e3 * common.cpu_min(lambda: algo.step(*tin), args.reps)
    share = {key: v / (args.reps + 1) * 1e3 for key, v in algo.timing.items()}  # wall means (warm-up included)
    print(f"# torch: {total / 1e9:.1f} GFLOP a step (FlopCounterMode): sample G chains {sample_fl / 1e9:.1f}, "
          f"reference chain {ref_fl / 1e9:.1f}, update (encode, get_logprobs x2, backward) "
          f"{(total - sample_fl - ref_fl) / 1e9:.1f}; step {step_ms:.0f} CPU ms (min); wall means: sample "
          f"{share['sample']:.0f} ms, score {share['score']:.0f} ms, update {share['update']:.0f} ms")


def _as_pure(mdef: ModuleDef, params) -> dict:
    """Converter output (nested numpy dict) -> the exact pure-dict structure of `mdef.init`."""
    from flax import nnx
    return nnx.state(mdef.bind(params), nnx.Param).to_pure_dict()


if __name__ == "__main__":
    sys.exit(main(ARGS))
