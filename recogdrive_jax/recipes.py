"""Upstream ReCogDrive recipes per model size, shared by `configs/recogdrive_{2b,8b}/<stage>.py`.

Sizes: '2b' (InternVL3-2B, Hv 1536) and '8b' (InternVL3-8B, Hv 3584); every shipped upstream script uses the
DiT `small` planner for both. A config file is then one call, e.g. `recipes.sft('8b')`, and the two sizes can
never drift apart. Commands (8B; replace 8b by 2b):

  python -m recogdrive_jax.main --config=configs/recogdrive_8b/sft.py --workdir=runs/sft8b \
      --config.model.init_from=/ckpt/InternVL3-8B --config.data.meta_path=/data/recogdrive_pretrain.json
  python -m recogdrive_jax.main --config=configs/recogdrive_8b/cache.py --workdir=runs/cache8b \
      --config.model.init_from=runs/sft8b
  python -m recogdrive_jax.main --config=configs/recogdrive_8b/il.py --workdir=runs/il8b \
      --config.data.cache_dir=runs/cache8b
  python -m recogdrive_jax.main --config=configs/recogdrive_8b/rl.py --workdir=runs/rl8b \
      --config.train.init_from=runs/il8b --config.data.cache_dir=runs/cache8b
  python -m recogdrive_jax.main --config=configs/recogdrive_8b/eval.py --workdir=runs/eval8b \
      --config.eval.checkpoint=runs/rl8b --config.data.cache_dir=runs/cache8b
"""
from __future__ import annotations

import dataclasses

import ml_collections

from recogdrive_jax import configs
from recogdrive_jax.models.planner import VLM_WIDTH
from recogdrive_jax.rl import grpo
from recogdrive_jax.stage_configs import cache_stage_config, sft_stage_config

SIZES = {"2b": dict(vlm="internvl3_2b", vlm_size="small"), "8b": dict(vlm="internvl3_8b", vlm_size="large")}
NUM_TRAIN_SCENES, NUM_EVAL_SCENES = 10_000, 512  # cache, il, rl and eval cover the same scenes


def _size(size: str) -> dict:
    if size not in SIZES:
        raise ValueError(f"recipe size {size!r} unknown; allowed: {sorted(SIZES)}")
    return SIZES[size]


def _vl_dim(size: str) -> int:
    """Hv of the size's VLM, the width of the cache the planner reads: a key of its own so a cache of another VLM
    (or the tiny one) can be named on the command line (`--config.planner.vl_dim=...`)."""
    return VLM_WIDTH[_size(size)["vlm_size"]]


def sft(size: str) -> ml_collections.ConfigDict:
    """Stage 1 (`internvl3_{2b,8b}_dynamic_res_2nd_finetune_recogdrive_pretrain.sh`, seed 000): lr 4e-5 cosine,
    warmup 0.1, weight decay 0.05, bf16, gradient checkpointing, max 12288 tokens, up to 16 tiles + thumbnail,
    drop path 0.1, global batch 128 with per-device batch 1 (grad accumulation from the device count), ZeRO-1,
    3 epochs. `model.init_from` = the InternVL3 HF directory (random init otherwise)."""
    c = sft_stage_config(variant=_size(size)["vlm"])
    c.model.init_from = ""
    c.model.drop_path_rate = 0.1
    c.data.max_seq_length = 12288
    c.data.max_dynamic_patch = 16
    c.data.per_device_batch_size = 1
    c.data.num_epochs = 3
    c.data.num_workers = 8
    c.train.batch_size = 128
    c.optim.grad_accum = 16  # overridden from per_device_batch_size and the device count at start-up
    c.train.log_every = 1
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    return c


def cache(size: str) -> ml_collections.ConfigDict:
    """The fine-tuned VLM over every trajectory sample's driving prompt (front camera, 4-pose history, command;
    upstream caches with max 12 tiles), per split. `cache.layout=upstream_compatible` writes upstream's layout
    (left-padded to 2800 tokens, fp32). `model.init_from` = the sft workdir or an HF directory."""
    del size  # the VLM comes from init_from; its width is read from there
    c = cache_stage_config()
    c.model.init_from = ""
    c.model.dtype = "bfloat16"
    c.data.num_train_scenes = NUM_TRAIN_SCENES
    c.data.num_eval_scenes = NUM_EVAL_SCENES
    c.cache.batch_size = 8
    c.cache.max_dynamic_patch = 12
    c.cache.splits = "train,eval,test"  # il/rl read train and eval; the eval recipe scores test
    return c


def il(size: str) -> ml_collections.ConfigDict:
    """Stage 2: DiT `small` on the cached VLM states, upstream IL optimiser (AdamW 1e-4, wd 1e-4, betas (0.9, 0.95),
    warmup-cosine to 1e-6, clip 1.0, EMA 0.999)."""
    c = configs.planner_stage_config("il", variant="small", vlm_size=_size(size)["vlm_size"])
    c.planner.vl_dim = _vl_dim(size)
    c.train.num_steps = 200_000
    c.train.batch_size = 512
    c.train.log_every = 100
    c.train.eval_every = 5000
    c.train.checkpoint_every = 5000
    c.optim.warmup_ratio = 0.01
    c.data.num_train_scenes = NUM_TRAIN_SCENES
    c.data.num_eval_scenes = NUM_EVAL_SCENES
    return c


def rl(size: str, epochs: int = 10) -> ml_collections.ConfigDict:
    """Stage 3 DiffGRPO (spec/planner.md §4): G = 8 chains per scene, PDM reward with progress 10 / TTC 5 / comfort
    2, gamma 0.6, log-prob clamp [-5, 2], BC weight 0.1, AdamW lr 1e-4 cosine to 0 without warmup over 10 epochs,
    grad clip 1.0. `train.init_from` (required) = the il workdir (EMA params) or a converted parameter checkpoint.
    Variants: `rl.algo=grpo_clip|reinforce_pp`, `rl.reward=epdms`, `rl.bc_weight`.

    Upstream steps the cosine once per epoch; here it decays per optimizer update over the same span. The batch is
    global: 64 scenes = upstream's 8 per GPU on one 8-GPU node (scale with the number of devices)."""
    c = configs.planner_stage_config("rl", variant="small", vlm_size=_size(size)["vlm_size"])
    c.planner.vl_dim = _vl_dim(size)
    c.rl = ml_collections.ConfigDict(dataclasses.asdict(grpo.GRPOConfig()))
    c.data.num_train_scenes = NUM_TRAIN_SCENES
    c.data.num_eval_scenes = NUM_EVAL_SCENES
    c.train.batch_size = 64
    c.train.num_steps = epochs * c.data.num_train_scenes // c.train.batch_size
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.train.ema_decay = 0.0  # the RL stage evaluates and saves the policy itself
    c.train.init_from = ""
    c.optim.update(dict(lr=1e-4, warmup_ratio=0.0, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0,
                        weight_decay=1e-4, b1=0.9, b2=0.95, clip_norm=1.0))
    c.eval.protocol = "upstream"  # upstream evaluates with the stochastic sampler (eta 1)
    c.eval.use_ema = False
    return c


def eval(size: str) -> ml_collections.ConfigDict:  # noqa: A001  (the stage's name)
    """PDM evaluation of a planner checkpoint (`eval.checkpoint`) or `eval.baseline=constant_velocity` on a split;
    writes WORKDIR/eval/<split>/metrics.json, metrics.md, per_scene.jsonl and BEV PNGs of the best/worst scenes.
    `eval.protocol=upstream` is upstream's stochastic evaluation (one eta = 1 sample per scene, seeded);
    `deterministic` is DDIM with eta 0; `upstream,deterministic` scores both."""
    c = configs.planner_stage_config("eval", variant="small", vlm_size=_size(size)["vlm_size"])
    c.planner.vl_dim = _vl_dim(size)
    del c["train"]
    del c["optim"]
    c.data.num_eval_scenes = NUM_EVAL_SCENES
    c.eval.split = "test"
    c.eval.protocol = "upstream"
    c.eval.num_plots = 6
    return c
