"""Stage 1 (`sft`): InternVL supervised fine-tuning on a QA mixture (upstream `internvl_chat_finetune.py`).

Starts from converted weights (`config.model.init_from`: a transformers / remote-code HF directory, an Orbax
directory written by `convert internvl --from-hf`, or another sft run's workdir) or from random init
(`config.model.variant`), on the mixture of a meta JSON (`config.data.meta_path`, upstream format with
`repeat_time`) or, when that is empty, on synthetic driving QA it generates itself (`config.data.synthetic_scenes`).
Loss only on assistant tokens (data/template.py), bf16 compute with fp32 master params, per-layer remat,
length-grouped (optionally packed) batches padded to a few static bucket shapes (data/length_grouping.py), freeze
flags for vision / LLM / mlp1, and the generic loop for ZeRO-1 + DP, gradient accumulation, checkpoints and exact
resume. At the end the weights are exported as a transformers-loadable directory (`WORKDIR/hf_export`).

Outputs: WORKDIR/{checkpoints, metrics.jsonl, recogdrive_internvl.json (model config), tokenizer/, hf_export/}.
A later stage (`cache`) points `config.model.init_from` at this workdir.

`config.eval.trajectory_scenes` > 0 adds the text-waypoint ADE to each eval (vlm/trajectory_eval.py: greedy answers
to the driving prompt on held-out scenes, parse rate, ADE/FDE vs constant velocity, WORKDIR/eval_trajectory/). On a
finished run, rerunning its command with `--config.eval.trajectory_scenes=N` trains nothing and runs that eval once.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from recogdrive_jax import config_types, configs, storage
from recogdrive_jax.envs import sft_data as virl_data
from recogdrive_jax.parallel import runtime as runtime_lib
from recogdrive_jax.train import loop
from recogdrive_jax.train.metrics import read_metrics
from recogdrive_jax.vlm import checkpoint as vlm_ckpt
from recogdrive_jax.vlm import hf_export, lm_loss, nav_eval, qa_batches, trajectory_eval
from recogdrive_jax.vlm.tokenizer import load_or_build_tokenizer


def validate(config) -> config_types.RunConfig:
    """The typed config (types and ranges: config_types.SFTDataConfig, ModelConfig, ExportConfig) + the checks that
    need files or span blocks."""
    def req(cond, key, msg):
        if not cond:
            raise configs.ConfigError(f"config.{key}: {msg}")
    for block in ("model", "data"):
        req(block in config, block, "missing (start from stage_configs.sft_stage_config())")
    config = config_types.typed(config)
    m, d = config.model, config.data
    if config.stage == "sft":
        req(bool(d.meta_path) or d.synthetic_scenes > 0 or "virl_sft" in config, "data.meta_path",
            "empty and config.data.synthetic_scenes is 0: give a meta JSON or a number of synthetic scenes")
        if d.meta_path:
            req(os.path.isfile(d.meta_path), "data.meta_path", f"{d.meta_path!r} is not a local file (a mixture "
                "and its images are read from local or mounted paths, also for a gs:// workdir)")
        if d.eval_meta_path:
            req(os.path.isfile(d.eval_meta_path), "data.eval_meta_path", f"{d.eval_meta_path!r} is not a local file")
        req(not (m.freeze_vision and m.freeze_llm and m.freeze_mlp), "model.freeze_*", "every part is frozen")
        req(not (config.eval.trajectory_scenes and "virl_sft" in config and not d.meta_path),
            "eval.trajectory_scenes", "the driving-trajectory eval needs a driving VLM, not the V-IRL SFT; use 0")
    return config


def derive_steps_and_accum(config, batches_per_epoch: int, num_devices: int) -> dict[str, int]:
    """{'train.num_steps': ..., 'optim.grad_accum': ...} derived from `data.num_epochs` / `data.per_device_batch_size`
    (config_types.derive_steps_and_accum; pure: the config is not changed, loop.train records them in config.json)."""
    return config_types.derive_steps_and_accum(config_types.typed(config), batches_per_epoch, num_devices)


def run(config, workdir: str) -> dict:
    config = validate(config)
    workdir = storage.abspath(workdir)  # a gs:// URL stays one: every output goes through `storage`
    storage.makedirs(workdir)
    resolved = vlm_ckpt.resolve_model(config.model, config.data, workdir)
    cfg = resolved.cfg
    virl = "virl_sft" in config and not config.data.meta_path      # V-IRL expert answers (configs/virl/sft.py)
    tok = load_or_build_tokenizer(resolved, workdir,
                                  corpus=(lambda: virl_data.tokenizer_corpus(config.env)) if virl else None)
    vlm_ckpt.save_model_files(cfg, tok, workdir)

    data = config.data
    if virl:
        remote = storage.is_remote(workdir)  # regenerable expert data: local scratch there (see qa_batches)
        out = storage.local_scratch(workdir, "virl_sft", process=jax.process_index()) if remote else \
            os.path.join(workdir, "virl_sft")
        meta = virl_data.write_from_config(config, out, each_process=remote)
    else:
        meta = data.meta_path or qa_batches.synthetic_qa(data, workdir, "train")
    eval_meta = data.eval_meta_path or (qa_batches.synthetic_qa(data, workdir, "eval")
                                        if not data.meta_path and data.synthetic_eval_scenes > 0 else "")
    gbs = int(config.train.batch_size)
    plan = qa_batches.build_batches(meta, tok, cfg, data, global_batch=gbs, seed=int(config.seed))
    eval_plan = qa_batches.build_batches(eval_meta, tok, cfg, data, global_batch=gbs, seed=int(config.seed) + 1,
                              for_eval=True) if eval_meta else None

    # Derived at run time (pure; recorded under `derived` in config.json, the config itself stays as given).
    derived = derive_steps_and_accum(config, plan.batches_per_epoch, jax.device_count())
    freeze = tuple(config.optim.freeze) + vlm_ckpt.freeze_patterns(config.model)
    if freeze != tuple(config.optim.freeze):
        derived["optim.freeze"] = freeze
    if resolved.params_path and not config.train.init_from:
        derived["train.init_from"] = resolved.params_path
    run_config = config.with_values(derived)
    mdef = vlm_ckpt.module_def(cfg, config.model.dtype)
    grad_accum = run_config.optim.grad_accum
    chunk = int(config.model.loss_chunk)
    drop_path = cfg.vision_config.drop_path_rate > 0
    loss_fn = lm_loss.make_loss_fn(mdef, chunk=chunk, drop_path=drop_path, grad_accum=grad_accum)
    rt = runtime_lib.from_config(config)
    local_devices = max(1, rt.batch_shards // jax.process_count())  # tiles packed flat per device and micro-batch
    plan.set_tile_groups(local_devices, grad_accum)
    if eval_plan is not None:
        eval_plan.set_tile_groups(local_devices, 1)
    eval_step = jax.jit(lambda p, b: lm_loss.forward_sums(mdef.bind(p), b, None, chunk=chunk, drop_path=False))
    trajectory = trajectory_eval.from_sft_config(config.eval, config.data, cfg, tok)  # None when off

    def eval_fn(state, step):
        out = {}
        if eval_plan is not None:
            nll = correct = count = 0.0
            for k, local in enumerate(eval_plan.eval_batches()):
                if config.eval.max_batches and k >= config.eval.max_batches:
                    break
                s = jax.device_get(eval_step(state.params, rt.global_batch(local)))
                nll, correct, count = nll + float(s[0]), correct + float(s[1]), count + float(s[2])
            out = {"loss": nll / max(count, 1.0), "token_acc": correct / max(count, 1.0), "label_tokens": count}
        if eval_nav_splits:
            res = nav_eval.evaluate(state.params, config, cfg, tok, storage.join(workdir, "eval_nav"), runtime=rt)
            out.update(nav_eval.flat_metrics(res))
        if trajectory is not None:  # the text-waypoint ADE vs CV on held-out scenes (WORKDIR/eval_trajectory)
            m = trajectory(state.params, mdef, runtime=rt, out_dir=storage.join(workdir, "eval_trajectory"),
                           step=step)
            out.update({f"trajectory/{k}": v for k, v in m.items()})
            if jax.process_index() == 0:
                print(f"[sft] step {step}: {trajectory_eval.summary_line(m)}", flush=True)
        if config.export.each_eval and step < run_config.train.num_steps:
            hf_export.export_hf(state.params, cfg, tok, storage.join(workdir, f"hf_export_step_{step:07d}"), config.export)
        return out

    eval_nav_splits = bool(virl and "eval_nav" in config and config.eval_nav.splits)
    task = loop.Task(name="sft", init_params=mdef.init, loss_fn=loss_fn, logical=mdef.logical,
                     train_iter=plan.iterator(int(data.num_workers), int(data.prefetch)),
                     eval_fn=eval_fn if (eval_plan is not None or config.export.each_eval or eval_nav_splits
                                         or trajectory is not None)
                     else None)
    if jax.process_index() == 0:
        print(f"[sft] {len(plan.rows)} rows, {plan.batches_per_epoch} batches/epoch of {gbs}; buckets "
              f"{plan.buckets} x tiles {plan.tile_buckets} a row, {plan.group_tile_buckets} a tile group; init "
              f"{run_config.train.init_from or 'random ' + config.model.variant}", flush=True)
    state, final = loop.train(config, workdir, task, runtime=rt, derived=derived)
    if config.export.at_end:
        hf_export.export_hf(state.params, cfg, tok, storage.join(workdir, "hf_export"), config.export)
    summary = summarize(workdir)
    summary.update({f"eval_{k}": v for k, v in final.items()})
    summary["skipped_samples"] = plan.skipped
    if jax.process_index() == 0:
        print(f"[sft] loss {summary.get('first_loss', float('nan')):.4f} -> {summary.get('last_loss', float('nan')):.4f}"
              f", token acc {summary.get('last_token_acc', float('nan')):.3f}, "
              f"{summary.get('tokens_per_sec', float('nan')):.0f} tokens/s"
              + (f", eval loss {final['loss']:.4f}" if "loss" in final else ""), flush=True)
    return summary


def summarize(workdir: str) -> dict:
    """First/last train loss, token accuracy and tokens/s (tokens per step × steps/s) from metrics.jsonl."""
    rows = [r for r in read_metrics(workdir, "train") if "loss" in r]
    if not rows:
        return {}
    last = rows[-1]
    tps = [r["tokens"] * r["steps_per_sec"] for r in rows[1:] if "tokens" in r] or \
          [r["tokens"] * r["steps_per_sec"] for r in rows if "tokens" in r]
    return {"first_loss": rows[0]["loss"], "last_loss": last["loss"], "last_token_acc": last.get("token_acc"),
            "tokens_per_sec": float(np.median(tps)) if tps else float("nan"), "steps": last["step"]}
