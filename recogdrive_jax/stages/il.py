"""Stage 2 (`il`): imitation learning of the planner (diffusion DiT or MLP head) on cached VLM states or the
synthetic world's scene tokens, evaluated on held-out scenes with ADE/FDE and the PDM score."""
from __future__ import annotations

import jax

from recogdrive_jax import config_types, storage
from recogdrive_jax.data import planner_data
from recogdrive_jax.eval import planner_common, planner_eval
from recogdrive_jax.models.planner import build_planner
from recogdrive_jax.train import loop
from recogdrive_jax.train.module_def import ModuleDef


def run(config, workdir: str) -> dict:
    config = config_types.typed(config)
    pcfg = planner_common.planner_config(config)
    mdef = ModuleDef(lambda rngs: build_planner(pcfg, rngs))
    train_split = planner_data.load_split(config.data, "train", pcfg.vl_dim)
    eval_split = planner_data.load_split(config.data, config.eval.split, pcfg.vl_dim, need_pdm=True)
    sampler = planner_eval.make_sampler(mdef, planner_eval.eval_protocols(config.eval)[0])
    eval_rng = jax.random.key(int(config.seed) + 17)

    def loss_fn(params, batch, rng):
        return mdef.bind(params).loss(batch, rng)

    def eval_fn(state, step):
        params = state.ema_params if (config.eval.use_ema and state.ema_params is not None) else state.params
        plans = planner_eval.plan_split(sampler, params, eval_split, eval_rng, int(config.eval.batch_size))
        per = planner_eval.score_plans(eval_split, plans, **config.eval.pdm_kwargs)
        planner_common.plot_examples(storage.join(workdir, "plots", f"step_{step:06d}"), eval_split, plans, per,
                                     int(config.eval.num_plots))
        return planner_eval.summarize(per)

    task = loop.Task(
        name="il", init_params=mdef.init, loss_fn=loss_fn, logical=mdef.logical, eval_fn=eval_fn,
        train_iter=planner_data.train_iterator(train_split, loop.local_batch_size(config), int(config.seed)),
        ema_decay=config.train.ema_decay)
    state, final = loop.train(config, workdir, task)
    baseline = planner_eval.summarize(planner_eval.score_plans(eval_split, planner_eval.constant_velocity_plans(eval_split),
                                                               **config.eval.pdm_kwargs))
    planner_eval.write_report(storage.join(workdir, "eval", eval_split.name), final,
                              {"il": final, "constant_velocity": baseline})
    if jax.process_index() == 0:
        print(f"[il] held-out PDMS {final.get('pdms', float('nan')):.4f} vs constant-velocity baseline "
              f"{baseline['pdms']:.4f} ({int(final.get('num_scenes', 0))} scenes; ADE {final.get('ade', float('nan')):.3f} m)",
              flush=True)
    return {**final, "baseline_pdms": baseline["pdms"]}
