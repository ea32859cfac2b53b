"""Stage `il_joint`: InternVL and the planner trained together from rendered front-camera frames and the driving
prompt, without the hidden-state cache — the planner's loss backpropagates into the LLM (`vlm/joint.py`).

`config.joint.head`: 'dit' (config.planner on the prompt's hidden states; optional LM loss on the trajectory answer)
or 'opentrackvla' (seed 002: coarse/fine frame tokens, TVI, [ACT], MLP head). `joint.train_llm` 'all' | 'last_n' |
'none' picks what of the LLM trains; `model.remat`, `mesh` / `parallel` (ZeRO-1, FSDP) work as in every stage.
Evaluated like `il` (PDMS, ADE/FDE, plots) on the held-out split, next to constant velocity.

Outputs besides the checkpoints: WORKDIR/vlm (start `cache` / `sft` from it, or from WORKDIR itself),
WORKDIR/planner (dit head; `eval --config.eval.checkpoint=WORKDIR/planner` or rl's `train.init_from`, on a cache
made from WORKDIR: the VLM then stays frozen, its states computed once per scene), WORKDIR/hf_export.
"""
from __future__ import annotations

import jax

from recogdrive_jax import storage
from recogdrive_jax.data import planner_data
from recogdrive_jax.eval import planner_common, planner_eval
from recogdrive_jax.parallel import runtime as runtime_lib
from recogdrive_jax.train import checkpoint as ckpt_lib
from recogdrive_jax.train import loop, optim
from recogdrive_jax.vlm import checkpoint as vlm_ckpt
from recogdrive_jax.vlm import joint
from recogdrive_jax.vlm.tokenizer import load_or_build_tokenizer


def run(config, workdir: str) -> dict:
    config = joint.validate(config)  # typed (config_types.RunConfig)
    workdir = storage.abspath(workdir)
    storage.makedirs(workdir)
    resolved = vlm_ckpt.resolve_model(config.model, None, workdir)
    cfg = resolved.cfg
    tok = load_or_build_tokenizer(resolved, workdir)
    vlm_ckpt.save_model_files(cfg, tok, workdir)
    train_split, eval_split = (planner_data.PlannerSplit(s, planner_data.synthetic_scenes(config.data, s), None, None)
                               for s in ("train", config.eval.split))
    pcfg = joint.head_config(config, cfg, train_split.scenes)
    mdef = joint.module_def(config, cfg, pcfg)
    inputs = joint.JointInputs(config, cfg, tok, [train_split, eval_split])
    # Derived at run time (pure; recorded under `derived` in config.json, the config itself stays as given).
    freeze = tuple(config.optim.freeze) + joint.freeze_patterns(config, cfg)
    derived = {"optim.freeze": freeze} if freeze != tuple(config.optim.freeze) else {}
    run_config = config.with_values(derived)
    rt = runtime_lib.from_config(config)
    sampler = joint.make_sampler(mdef)
    eval_rng = jax.random.key(int(config.seed) + 17)
    ema_decay = config.train.ema_decay
    pdm_kwargs = config.eval.pdm_kwargs

    def load_init(abstract, shardings, rng):
        """The VLM from config.model (random init when it has no weights), the planner / head freshly initialised."""
        params = jax.jit(mdef.init, out_shardings=shardings)(rng)
        if resolved.params_path is not None:
            target = ckpt_lib.attach_shardings(abstract["vlm"], shardings["vlm"])
            params["vlm"] = ckpt_lib.load_params(resolved.params_path, target)
        return params

    def eval_fn(state, step):
        params = state.ema_params if (config.eval.use_ema and state.ema_params is not None) else state.params
        plans = joint.plan_split(sampler, params, inputs, eval_split, eval_rng, int(config.eval.batch_size))
        per = planner_eval.score_plans(eval_split, plans, **pdm_kwargs)
        planner_common.plot_examples(storage.join(workdir, "plots", f"step_{step:06d}"), eval_split, plans, per,
                                     int(config.eval.num_plots))
        return planner_eval.summarize(per)

    loss_fn = joint.make_loss_fn(config, mdef, frozen=freeze)
    task = loop.Task(
        name="il_joint", init_params=mdef.init, loss_fn=None, logical=mdef.logical, eval_fn=eval_fn,
        train_iter=inputs.train_iterator(train_split, loop.local_batch_size(config), int(config.seed)),
        ema_decay=ema_decay, load_init=load_init,
        make_update=joint.make_update(run_config, loss_fn, cfg, ema_decay,
                                      optim.make_schedule(run_config.optim, int(config.train.num_steps))))
    if jax.process_index() == 0:
        print(f"[il_joint] head {config.joint.head}, LLM {config.joint.train_llm}, frozen {list(freeze)}; "
              f"prompt {inputs.t_vl} tokens (row {inputs.t_pad}); init "
              f"{resolved.params_path or 'random ' + config.model.variant}", flush=True)
    state, final = loop.train(config, workdir, task, runtime=rt, derived=derived)
    exported = joint.export_parts(state, config, cfg, tok, workdir)
    baseline = planner_eval.summarize(planner_eval.score_plans(eval_split, planner_eval.constant_velocity_plans(eval_split),
                                                               **pdm_kwargs))
    planner_eval.write_report(storage.join(workdir, "eval", eval_split.name), final,
                              {"il_joint": final, "constant_velocity": baseline})
    if jax.process_index() == 0:
        print(f"[il_joint] held-out PDMS {final.get('pdms', float('nan')):.4f} vs constant-velocity baseline "
              f"{baseline['pdms']:.4f} ({int(final.get('num_scenes', 0))} scenes; ADE {final.get('ade', float('nan')):.3f} m)"
              f"; exported {', '.join(f'{k}={v}' for k, v in exported.items())}", flush=True)
    return {**final, "baseline_pdms": baseline["pdms"]}
