"""VLM-PPO env steps/s (rollout + update) of the JAX stage pieces vs a PyTorch/transformers loop, interleaved.

    python bench/ppo.py                  # tiny InternVL (configs/virl ppo tiny), 4 envs x 2 steps an update
    python bench/ppo.py --quick          # 2 envs x 1 step, short answers: the smoke path (tests/test_bench_vlm.py)

Both sides run in this process on the same weights (a random transformers `InternVLForConditionalGeneration`
(default `sdpa` attention) converted to the Flax port, and the JAX value head copied into a torch MLP), the same
navigation envs (same seeds), the same chat encoder (prompt token ids, left padding to P, image tiles) and the same
PPO settings:
* rollout step: sample ≤ A new tokens at T = 0.2 with the KV cache (JAX: `internvl.generate`; torch:
  `model.generate(do_sample=True)`), a no-grad scoring pass over prompt + answer for logp_old / V_old (fp32
  log_softmax of logits / T at the answer positions, `answer_token_weights`), then `env.step(text)`;
* bootstrap value, host GAE (γ 0.9, λ 0.95) and per-buffer normalisation;
* update: epochs × minibatches × grad-accum micro-batches of the clipped PPO loss, clip_by_global_norm 0.01 +
  Adam (JAX: the jitted `rl.ppo` update; torch: backward per micro-batch, `clip_grad_norm_`, `torch.optim.Adam`).
One repeat = one rollout + update of each side. Method: bench/common.py (ABAB repeats, ≥ 5, min/median, JAX compile
apart, single-threaded both sides by default, the quiet gate on the RESULTS row). Prints
`ppo_env_steps_jax_vs_torch: 1.4x` (env steps/s ratio, > 1 = JAX faster; min over repeats).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402


def _parse(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--envs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="interleaved repeats (rollout + update) per side (>= 5)")
    ap.add_argument("--new", type=int, default=24, help="max new tokens per answer")
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="1 = single-threaded XLA and torch (recordable); 0 = "
                                                           "defaults")
    ap.add_argument("--quick", action="store_true", help="2 envs x 1 step: a smoke run, not a figure")
    ap.add_argument("--split", action="store_true", help="also time the rollout and the update apart (interleaved "
                                                         "each): where the time goes on each side")
    ap.add_argument("--profile", metavar="DIR", help="instead of timing: per-op profile of the JAX update and "
                                                     "rollout (jax.profiler, per-thunk events) and of torch's")
    ap.add_argument("--profile-side", choices=("both", "jax", "torch"), default="both")
    a = ap.parse_args(argv)
    if a.quick:
        a.envs, a.steps, a.micro = 2, 1, 1
    return a


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads == 1:
    common.single_thread()  # before jax and torch initialise
if ARGS is not None and ARGS.profile:  # one trace event per XLA CPU thunk (fusion, dot, ...)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

import recogdrive_jax  # noqa: E402,F401
from recogdrive_jax.convert import internvl as cv  # noqa: E402
from recogdrive_jax.envs import navigation as nav  # noqa: E402
from recogdrive_jax.rl import ppo as ppo_lib  # noqa: E402
from recogdrive_jax.train.state import init_train_state  # noqa: E402
from recogdrive_jax.vlm import chat, nav_policy  # noqa: E402

GAMMA, LAM, CLIP, VCLIP, VCOEF, RATIO_CAP, TEMP, MAX_NORM, LR = 0.9, 0.95, 0.1, 0.1, 0.5, 10.0, 0.2, 0.01, 1e-5


def bench_config(args) -> ml_collections.ConfigDict:
    """The configs/virl tiny setup with the bench's sizes."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("ppo_cfg", os.path.join(root, "configs", "virl", "ppo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny")
    c.ppo.num_envs, c.ppo.num_steps = args.envs, args.steps
    c.ppo.epochs, c.ppo.num_minibatches = 2, 2
    c.ppo.minibatch_grad_accum = args.envs * args.steps // (2 * args.micro)
    c.prompt.max_new_tokens = args.new
    c.env.n_train_routes = 8
    return c


class TorchPPO:
    """The same rollout + PPO update loop written against transformers + torch."""

    def __init__(self, model, value_params, encoder, envs, prompt_len, hp: ppo_lib.PPOHParams, micro: int):
        self.m, self.enc, self.envs, self.P, self.hp, self.micro = model, encoder, envs, prompt_len, hp, micro
        layers = [value_params["layers"][str(i)] for i in range(len(value_params["layers"]))]
        dims = [np.asarray(layers[i]["kernel"]).shape for i in range(len(layers))]
        mods = []
        for i, (din, dout) in enumerate(dims):
            lin = torch.nn.Linear(din, dout)
            with torch.no_grad():
                lin.weight.copy_(torch.tensor(np.asarray(layers[i]["kernel"]).T))
                lin.bias.copy_(torch.tensor(np.asarray(layers[i]["bias"])))
            mods += [lin, torch.nn.ReLU()] if i < len(dims) - 1 else [lin]
        self.vh = torch.nn.Sequential(*mods)
        self.opt = torch.optim.Adam(list(self.m.parameters()) + list(self.vh.parameters()), lr=LR, eps=1e-7)
        self.obs = [e.reset(seed=1000 + k)[0] for k, e in enumerate(envs)]

    def score(self, ids, mask, pv, weights):
        """→ (logp [B], values [B]) with grad; same math as rl.ppo.score."""
        pos = torch.clamp(torch.cumsum(mask, -1) - 1, min=0)
        # A sampled <IMG_CONTEXT> in the answer would make HF count one image token too many; the JAX side keeps
        # its token embedding, here it is scored as padding (same cost, only matters for timing).
        ans = ids[:, self.P:]
        ids = torch.cat([ids[:, :self.P], torch.where(ans == self.m.config.image_token_id,
                                                      torch.full_like(ans, self.enc.pad_id), ans)], 1)
        out = self.m(input_ids=ids, attention_mask=mask, pixel_values=pv, position_ids=pos,
                     output_hidden_states=True, logits_to_keep=0)
        h = out.hidden_states[-1]
        values = self.vh(h[:, self.P - 1]).squeeze(-1)
        logits = out.logits[:, self.P - 1:-1].float() / TEMP
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, self.P:, None]).squeeze(-1)
        return torch.where(weights != 0, lp * weights, torch.zeros_like(lp)).sum(-1), values

    def rollout(self, steps):
        rows, rewards, terms, truncs, values = [], [], [], [], []
        for _ in range(steps):
            p = chat.stack([self.enc.encode_prompt(o) for o in self.obs])
            ids = torch.tensor(p["prompt_ids"], dtype=torch.long)
            mask = torch.tensor(p["prompt_mask"], dtype=torch.long)
            pv = torch.tensor(p["pixel_values"][:, 0].transpose(0, 3, 1, 2))
            with torch.no_grad():
                gen = self.m.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, do_sample=True,
                                      temperature=TEMP, top_p=1.0, top_k=0, max_new_tokens=self.enc.layout.answer_len,
                                      eos_token_id=self.enc.eos_id, pad_token_id=self.enc.pad_id)
            out = np.full((len(self.obs), self.enc.layout.answer_len), self.enc.pad_id, np.int32)
            g = gen[:, ids.shape[1]:].numpy()
            out[:, :g.shape[1]] = g
            dec = [self.enc.decode_answer(o) for o in out]
            amask, w = np.stack([d[2] for d in dec]), np.stack([d[1] for d in dec])
            full = chat.join_sequences(p, out, amask)
            t_ids, t_mask = torch.tensor(full["input_ids"], dtype=torch.long), torch.tensor(full["attention_mask"])
            with torch.no_grad():
                logp, v = self.score(t_ids, t_mask, pv, torch.tensor(w))
            rows.append((t_ids, t_mask, pv, torch.tensor(w), logp, v))
            values.append(v.numpy())
            r_t, te_t, tr_t = [], [], []
            for k, (text, _, _) in enumerate(dec):
                o, r, te, tr, _ = self.envs[k].step(text)
                if te or tr:
                    o = self.envs[k].reset()[0]
                self.obs[k] = o
                r_t.append(r), te_t.append(te), tr_t.append(tr)
            rewards.append(r_t), terms.append(te_t), truncs.append(tr_t)
        p = chat.stack([self.enc.encode_prompt(o) for o in self.obs])
        empty = np.full((len(self.obs), self.enc.layout.answer_len), self.enc.pad_id, np.int32)
        full = chat.join_sequences(p, empty, np.zeros_like(empty))
        with torch.no_grad():
            _, nv = self.score(torch.tensor(full["input_ids"], dtype=torch.long),
                               torch.tensor(full["attention_mask"]),
                               torch.tensor(p["pixel_values"][:, 0].transpose(0, 3, 1, 2)),
                               torch.zeros(empty.shape))
        adv, ret = ppo_lib.rollout_advantages(np.asarray(rewards, np.float32), np.stack(values + [nv.numpy()]),
                                              np.asarray(terms, np.float32), np.asarray(truncs, np.float32),
                                              gamma=GAMMA, lam=LAM)
        cat = [torch.cat([r[i] for r in rows]) for i in range(6)]
        return cat + [torch.tensor(adv.reshape(-1)), torch.tensor(ret.reshape(-1))]

    def update(self, buf):
        ids, mask, pv, w, old_logp, old_v, adv, ret = buf
        n = ids.shape[0]
        for _ in range(self.hp.epochs):
            perm = torch.randperm(n)
            for mb in perm.view(self.hp.num_minibatches, -1):
                self.opt.zero_grad()
                for idx in mb.view(-1, self.micro):
                    logp, v = self.score(ids[idx], mask[idx], pv[idx], w[idx])
                    ratio = torch.exp(logp - old_logp[idx])
                    s1, s2 = ratio * adv[idx], torch.clamp(ratio, 1 - CLIP, 1 + CLIP) * adv[idx]
                    pi = torch.where(ratio > RATIO_CAP, -s2, -torch.minimum(s1, s2)).mean()
                    vc = old_v[idx] + torch.clamp(v - old_v[idx], -VCLIP, VCLIP)
                    vl = 0.5 * torch.maximum((v - ret[idx]) ** 2, (vc - ret[idx]) ** 2).mean()
                    ((pi + VCOEF * vl) / self.hp.grad_accum).backward()
                torch.nn.utils.clip_grad_norm_(list(self.m.parameters()) + list(self.vh.parameters()), MAX_NORM)
                self.opt.step()


def split_phases(args, it, update, box, tp) -> None:
    """Rollout alone and update alone, each interleaved like the whole step: which phase loses, on which side."""
    def jax_rollout():
        it.set_params(box["state"].params)
        box["batch"] = jax.block_until_ready(next(it))

    jax_rollout()
    buf = tp.rollout(args.steps)

    def jax_update():
        box["state"], m = update(box["state"], box["batch"], jax.random.key(box["k"]))
        box["k"] += 1
        jax.block_until_ready(m["loss"])

    for name, base, fn in (("ppo_rollout_jax_vs_torch", lambda: tp.rollout(args.steps), jax_rollout),
                           ("ppo_update_jax_vs_torch", lambda: tp.update(buf), jax_update)):
        common.interleaved(name, base, fn, reps=args.reps).print(unit="s", scale=1.0)


def profile_ppo(args, it, update, box, tp, top: int = 25) -> None:
    """Per-op time of the PPO update and per-jitted-function time of the rollout, each side (shares within one
    process: meaningful on a loaded machine, absolute times are not)."""
    from bench.sft import _categories, _hlo_kinds, _perfetto_events, _profile_torch, _table, thunk_rows
    it.set_params(box["state"].params)
    batch = jax.block_until_ready(next(it))
    buf = tp.rollout(args.steps)
    if args.profile_side != "jax":
        print("# ---- torch update")
        _profile_torch(lambda: tp.update(buf), 1, top)
        print("# ---- torch rollout")
        _profile_torch(lambda: tp.rollout(args.steps), 1, top)
    if args.profile_side == "torch":
        return
    compiled = update.lower(box["state"], batch, jax.random.key(0)).compile()
    hlo = compiled.as_text()
    with open(os.path.join(args.profile, "ppo_update.hlo.txt"), "w") as f:
        f.write(hlo)
    kinds = _hlo_kinds(hlo)

    def jax_update():
        box["state"], m = compiled(box["state"], batch, jax.random.key(1))
        jax.block_until_ready(m["loss"])

    jax_update()
    rows = thunk_rows(os.path.join(args.profile, "update"), kinds, jax_update, 1)
    total = sum(r[1] for r in rows)
    print("# ---- JAX update")
    _table(rows, total, top, f"JAX PPO update, XLA CPU thunks ({len(rows)} ops seen)")
    _categories(rows, total, "JAX update")

    roll_dir = os.path.join(args.profile, "rollout")
    it.set_params(box["state"].params)
    jax.profiler.start_trace(roll_dir, create_perfetto_trace=True)
    jax.block_until_ready(next(it))
    jax.profiler.stop_trace()
    events = _perfetto_events(roll_dir)
    wall = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) * 1e-6
    per_fn: dict[str, list[float]] = {}
    for e in events:
        if e["name"].startswith(("PjitFunction", "jit_", "pmap")) or "XlaModule" in e["name"]:
            per_fn.setdefault(e["name"], [0.0, 0])
            per_fn[e["name"]][0] += e["dur"] * 1e-6
            per_fn[e["name"]][1] += 1
    print(f"# ---- JAX rollout: {wall:.2f} s traced; per jitted function (inclusive time, calls):")
    for name, (dur, calls) in sorted(per_fn.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"# | {name[:90]} | {dur * 1e3:.0f} ms | {100 * dur / wall:.0f}% | {calls} |")


def main(args) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from recogdrive_jax.stages import ppo as stage
    config = bench_config(args)
    import tempfile
    model = nav_policy.NavModel(config, tempfile.mkdtemp())
    policy = nav_policy.NavPolicy(config, model.cfg, model.tokenizer)
    cfg = policy.cfg
    tm = common.hf_internvl(cfg, train=False)
    vlm = cv.load_hf_model({k: v.detach().numpy() for k, v in tm.state_dict().items()}, cfg, layout="native")
    from flax import nnx
    params = ppo_lib.str_keys(policy.mdef.init(jax.random.key(0)))
    params["vlm"] = ppo_lib.str_keys(nnx.state(vlm, nnx.Param).to_pure_dict())
    value_np = jax.tree.map(np.array, params["value_head"])      # the JAX update donates its state
    hp = ppo_lib.PPOHParams.from_config(config.ppo)

    # ---- JAX: the stage's rollout iterator + the jitted update
    it = stage.RolloutIterator(config, policy, None)
    tx = optax.chain(optax.clip_by_global_norm(MAX_NORM), optax.adam(LR, eps=1e-7))
    update = jax.jit(ppo_lib.make_ppo_update(policy.mdef, tx, hp, policy.layout.prompt_len), donate_argnums=(0,))
    box = {"state": init_train_state(params, tx), "k": 0}

    def jax_update():
        it.set_params(box["state"].params)
        batch = next(it)
        box["state"], m = update(box["state"], batch, jax.random.key(box["k"]))
        box["k"] += 1
        jax.block_until_ready(m["loss"])

    # ---- torch: the same loop with transformers
    envs = [nav.make_env_from_config("in_distribution", config.env, seed=42 + e) for e in range(args.envs)]
    tp = TorchPPO(tm.train(), value_np, policy.encoder, envs, policy.layout.prompt_len, hp,
                  micro=args.micro)

    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        profile_ppo(args, it, update, box, tp)
        return 0
    print(f"# ppo bench: tiny InternVL (vit {cfg.vision_config.hidden_size}x{cfg.vision_config.num_hidden_layers}, "
          f"llm {cfg.llm_config.hidden_size}x{cfg.llm_config.num_hidden_layers}, vocab {cfg.llm_config.vocab_size}), "
          f"{args.envs} envs x {args.steps} steps/update, P={policy.layout.prompt_len} A={args.new}, "
          f"{hp.epochs} epochs x {hp.num_minibatches} minibatches x {hp.grad_accum} micro-batches; "
          f"{jax.device_count()} JAX device(s), torch threads {torch.get_num_threads()}, {common.load_average()}")
    t = common.interleaved("ppo_env_steps_jax_vs_torch", lambda: tp.update(tp.rollout(args.steps)), jax_update,
                           reps=args.reps)
    t.print(unit="s", scale=1.0)
    if args.split:
        split_phases(args, it, update, box, tp)
    n_steps = args.envs * args.steps
    print(f"# env steps/s (rollout + update, min time): jax {n_steps / min(t.jax_s):.2f}  torch "
          f"{n_steps / min(t.baseline_s):.2f}")
    if not args.quick:
        common.print_results_row([t], "python bench/ppo.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(ARGS))
