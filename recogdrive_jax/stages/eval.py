"""Stage `eval`: scores a planner checkpoint (or the constant-velocity baseline) on a split.

Writes WORKDIR/eval/<split>/metrics.json (nc, dac, ddc, ttc, ep, comfort, pdms, epdms, ade, fde, num_scenes),
metrics.md (the planner next to the constant-velocity baseline), per_scene.jsonl, NAVSIM's result CSV
(navsim_pdm_score.csv, eval/navsim_csv.py; tokens are NAVSIM's with data.source='navsim') and BEV PNGs of the best and
worst scenes. `config.eval.checkpoint` is a run workdir (its latest checkpoint; EMA params when
`config.eval.use_ema`) or a parameter checkpoint directory (e.g. converted from PyTorch);
`--config.eval.baseline=constant_velocity` scores the baseline instead. `config.eval.protocol` picks how the
diffusion planner samples (`upstream`: the agent's stochastic eta = 1 sampling, seeded; `deterministic`: DDIM eta 0);
a comma list scores each, one row per protocol in metrics.md, '<protocol>/<key>' entries in metrics.json.
"""
from __future__ import annotations

import json

import jax

from recogdrive_jax import config_types, provenance, storage
from recogdrive_jax.configs import ConfigError
from recogdrive_jax.data import planner_data
from recogdrive_jax.eval import navsim_csv, planner_common, planner_eval
from recogdrive_jax.models.planner import build_planner
from recogdrive_jax.parallel import runtime as runtime_lib
from recogdrive_jax.train import checkpoint as ckpt_lib
from recogdrive_jax.train.module_def import ModuleDef

BASELINES = ("constant_velocity",)


def load_planner_params(config, mdef: ModuleDef, rt: runtime_lib.Runtime):
    path = config.eval.checkpoint
    if not path:
        raise ConfigError("config.eval.checkpoint: required (a run workdir or a parameter checkpoint dir), or set "
                          "config.eval.baseline=constant_velocity")
    if not storage.isdir(path):
        raise ConfigError(f"config.eval.checkpoint={path!r}: no such directory")
    return ckpt_lib.load_params(path, rt.targets(mdef.abstract_params(), mdef.logical),
                                prefer_ema=bool(config.eval.use_ema))


def run(config, workdir: str) -> dict:
    config = config_types.typed(config)
    ecfg = config.eval
    baseline = ecfg.baseline
    if baseline and baseline not in BASELINES:
        raise ConfigError(f"config.eval.baseline: unknown {baseline!r}; allowed: {list(BASELINES)} or ''")
    protocols = planner_eval.eval_protocols(ecfg)
    split_name = ecfg.split
    if split_name not in planner_data.SPLITS:
        raise ConfigError(f"config.eval.split: unknown {split_name!r}; allowed: {list(planner_data.SPLITS)}")
    # config.json first (a failing eval still says what it was asked to score); `scored` = the checkpoint and step
    scored = {"baseline": baseline} if baseline else {
        "checkpoint": ckpt_lib.checkpoint_ref(ecfg.checkpoint), "use_ema": bool(ecfg.use_ema)}
    provenance.write_config(config, workdir, extra={"scored": scored})
    pcfg = planner_common.planner_config(config)
    split = planner_data.load_split(config.data, split_name, pcfg.vl_dim, need_pdm=True)
    cv_plans = planner_eval.constant_velocity_plans(split)
    cv_per = planner_eval.score_plans(split, cv_plans, **ecfg.pdm_kwargs)
    cv = planner_eval.summarize(cv_per)
    if baseline:
        name, plans, per, summary = baseline, cv_plans, cv_per, cv
        rows = {baseline: cv}
    else:
        mdef = ModuleDef(lambda rngs: build_planner(pcfg, rngs))
        params = load_planner_params(config, mdef, runtime_lib.from_config(config))
        # the step really loaded (a corrupt newest step falls back to an older one): config.json says that one
        scored["checkpoint"] = ckpt_lib.checkpoint_ref(ecfg.checkpoint)
        provenance.write_config(config, workdir, extra={"scored": scored})
        name, rows, others = "planner", {}, {}
        for i, protocol in enumerate(protocols):  # the same seeded noise for each protocol: a paired comparison
            sampler = planner_eval.make_sampler(mdef, protocol)
            p_plans = planner_eval.plan_split(sampler, params, split, jax.random.key(int(config.seed) + 17),
                                              int(ecfg.batch_size))
            p_per = planner_eval.score_plans(split, p_plans, **ecfg.pdm_kwargs)
            rows[f"planner ({protocol})"] = planner_eval.summarize(p_per)
            if i == 0:
                plans, per, summary = p_plans, p_per, rows[f"planner ({protocol})"]
            else:  # metrics.json: '<protocol>/<key>' next to the headline's keys
                others.update({f"{protocol}/{k}": v for k, v in rows[f"planner ({protocol})"].items()
                               if k != "num_scenes"})
        summary = {**summary, "protocol": protocols[0], **others}
        rows["constant_velocity"] = cv
    out_dir = storage.join(workdir, "eval", split_name)
    planner_eval.write_report(out_dir, summary, rows)
    if jax.process_index() == 0:
        storage.write_text(storage.join(out_dir, "per_scene.jsonl"), "".join(
            json.dumps({"index": i, **{k: float(v[i]) for k, v in per.items()}}) + "\n" for i in range(len(split))))
        tokens = split.tokens if split.tokens is not None else [f"{split_name}-{i}" for i in range(len(split))]
        navsim_csv.write_csv(out_dir, tokens, per)
    planner_common.plot_examples(out_dir, split, plans, per, int(ecfg.num_plots))
    if jax.process_index() == 0:
        shown = [(name, summary)] if baseline else [(k, v) for k, v in rows.items() if k != "constant_velocity"]
        for row, r in shown:
            print(f"[eval] {row} on {split_name} ({r['num_scenes']} scenes): PDMS {r['pdms']:.4f} "
                  f"EPDMS {r['epdms']:.4f} ADE {r['ade']:.3f} m FDE {r['fde']:.3f} m "
                  f"(constant-velocity PDMS {cv['pdms']:.4f})", flush=True)
        print(planner_eval.markdown_table(rows), flush=True)
    return {**summary, "name": name}
