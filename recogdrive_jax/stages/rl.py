"""Stage 3 (`rl`): DiffGRPO fine-tuning of the diffusion planner from an IL checkpoint with PDM rewards.

The frozen reference is the initial (IL) policy: loaded from `config.train.init_from` on the first start and kept
in `WORKDIR/reference_params`, so a resumed run uses the same reference even if the IL run moved on. The update is
`rl/grpo.py` (sampling + PDM + update in one jit, sharded by the loop); the held-out PDMS of the reference is
computed once (`WORKDIR/eval/reference.json`) and reported side by side with the RL policy.
"""
from __future__ import annotations

import json

import jax
import numpy as np

from recogdrive_jax import config_types, storage
from recogdrive_jax.configs import ConfigError
from recogdrive_jax.data import planner_data
from recogdrive_jax.eval import planner_common, planner_eval
from recogdrive_jax.models.planner import build_planner
from recogdrive_jax.parallel import runtime as runtime_lib
from recogdrive_jax.rl import grpo
from recogdrive_jax.train import checkpoint as ckpt_lib
from recogdrive_jax.train import loop, optim
from recogdrive_jax.train.module_def import ModuleDef

REFERENCE_DIR = "reference_params"


def rl_config(config) -> grpo.GRPOConfig:
    if "rl" not in config:
        raise ConfigError("config.rl: missing; the rl stage needs the DiffGRPO block (configs/recogdrive_8b/rl.py)")
    try:
        return grpo.GRPOConfig.from_mapping(config.rl)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e) if str(e).startswith("config.") else f"config.rl: {e}") from None


def validate(config, pcfg, rcfg: grpo.GRPOConfig) -> None:
    if pcfg.kind != "diffusion" or pcfg.sampling_method != "ddim":
        raise ConfigError(f"config.planner: the rl stage needs kind='diffusion' with sampling_method='ddim' (chain "
                          f"log-probs), got kind={pcfg.kind!r}, sampling_method={pcfg.sampling_method!r}")
    if not config.train.init_from:
        raise ConfigError("config.train.init_from: required for the rl stage (an il workdir, whose EMA params are "
                          "used, or a parameter checkpoint converted from PyTorch)")
    n = int(config.train.batch_size) * rcfg.group_size
    if rcfg.algo == "grpo_clip" and n % rcfg.num_minibatches:
        raise ConfigError(f"config.rl.num_minibatches={rcfg.num_minibatches} must divide train.batch_size x "
                          f"rl.group_size = {n}")


def reference_params(config, workdir: str, mdef: ModuleDef, rt: runtime_lib.Runtime):
    """The frozen reference: WORKDIR/reference_params when present (resume), else `init_from` (then saved there)."""
    target = rt.targets(mdef.abstract_params(), mdef.logical, what="rl reference")
    saved = storage.join(workdir, REFERENCE_DIR)
    if storage.isdir(saved):
        return ckpt_lib.load_params(saved, target)
    params = ckpt_lib.load_params(config.train.init_from, target)
    ckpt_lib.save_params(saved, params)
    return params


def run(config, workdir: str) -> dict:
    config = config_types.typed(config)
    pcfg = planner_common.planner_config(config)
    rcfg = rl_config(config)
    validate(config, pcfg, rcfg)
    storage.makedirs(workdir)
    mdef = ModuleDef(lambda rngs: build_planner(pcfg, rngs))
    rt = runtime_lib.from_config(config)
    train_split = planner_data.load_split(config.data, "train", pcfg.vl_dim, need_pdm=True)
    eval_split = planner_data.load_split(config.data, config.eval.split, pcfg.vl_dim, need_pdm=True)
    ref = reference_params(config, workdir, mdef, rt)
    sampler = planner_eval.make_sampler(mdef, planner_eval.eval_protocols(config.eval)[0])
    eval_rng = jax.random.key(int(config.seed) + 17)
    num_steps = int(config.train.num_steps)
    ema_decay = config.train.ema_decay

    def evaluate(params) -> tuple[dict, np.ndarray, dict]:
        plans = planner_eval.plan_split(sampler, params, eval_split, eval_rng, int(config.eval.batch_size))
        per = planner_eval.score_plans(eval_split, plans, **config.eval.pdm_kwargs)
        summary = planner_eval.summarize(per)
        summary["end_reverse_frac"] = float(np.mean(np.asarray(grpo.end_reverse(plans))))
        return summary, plans, per

    ref_path = storage.join(workdir, "eval", "reference.json")
    if storage.exists(ref_path):
        ref_summary = json.loads(storage.read_text(ref_path))
    else:
        ref_summary = evaluate(ref)[0]
        if jax.process_index() == 0:
            storage.write_text(ref_path, json.dumps(ref_summary, indent=2))
    if jax.process_index() == 0:
        print(f"[rl] reference (initial) policy: held-out PDMS {ref_summary['pdms']:.4f} EPDMS "
              f"{ref_summary['epdms']:.4f}", flush=True)

    def eval_fn(state, step):
        params = state.ema_params if (config.eval.use_ema and state.ema_params is not None) else state.params
        summary, plans, per = evaluate(params)
        planner_common.plot_examples(storage.join(workdir, "plots", f"step_{step:06d}"), eval_split, plans, per,
                                     int(config.eval.num_plots))
        return summary

    # the reward is scored inside the jitted update: the regulariser applies, float64 does not (eval only)
    reward_fn = grpo.pdm_reward_fn(rcfg, lqr_regulariser=config.eval.pdm_regulariser)

    def make_update(tx):
        inner_tx, schedule = tx, optim.make_schedule(config.optim, num_steps)
        if rcfg.updates_per_step > 1:  # one schedule step per minibatch update (same optimizer-state structure)
            total = num_steps * rcfg.updates_per_step
            inner_tx = optim.make_optimizer(config.optim, total, mdef.abstract_params())
            schedule = optim.make_schedule(config.optim, total)
        return grpo.make_update(mdef.bind, rcfg, inner_tx, reward_fn=reward_fn, num_denoise_steps=pcfg.num_inference_steps,
                                schedule=schedule, ema_decay=ema_decay)

    task = loop.Task(
        name="rl", init_params=mdef.init, loss_fn=None, logical=mdef.logical, eval_fn=eval_fn,
        train_iter=planner_data.rl_iterator(train_split, loop.local_batch_size(config), int(config.seed)),
        ema_decay=ema_decay, make_update=make_update, extra=ref)
    _, final = loop.train(config, workdir, task, runtime=rt)
    baseline = planner_eval.summarize(planner_eval.score_plans(eval_split,
                                                               planner_eval.constant_velocity_plans(eval_split),
                                                               **config.eval.pdm_kwargs))
    planner_eval.write_report(storage.join(workdir, "eval", eval_split.name), final,
                              {"rl": final, "reference (il)": ref_summary, "constant_velocity": baseline})
    if jax.process_index() == 0:
        print(f"[rl] held-out PDMS {final.get('pdms', float('nan')):.4f} (reference {ref_summary['pdms']:.4f}, "
              f"constant-velocity {baseline['pdms']:.4f}); EPDMS {final.get('epdms', float('nan')):.4f} "
              f"(reference {ref_summary['epdms']:.4f}); {int(final.get('num_scenes', 0))} scenes", flush=True)
    return {**final, "reference_pdms": ref_summary["pdms"], "reference_epdms": ref_summary["epdms"],
            "baseline_pdms": baseline["pdms"]}
