"""Stage 3 (DiffGRPO) for ReCogDrive-8B: DiT `small` planner on InternVL3-8B hidden states (Hv 3584), upstream RL recipe
(spec/planner.md §4): G = 8 chains per scene, PDM reward with progress 10 / TTC 5 / comfort 2, gamma 0.6,
log-prob clamp [-5, 2], BC weight 0.1, AdamW lr 1e-4 cosine to 0 without warmup over 10 epochs, grad clip 1.0.

  python -m recogdrive_jax.main --config=configs/recogdrive_8b/rl.py --workdir=runs/rl8b \
      --config.train.init_from=runs/il8b --config.data.cache_dir=runs/cache8b
  # variants: --config.rl.algo=grpo_clip | reinforce_pp ; --config.rl.reward=epdms ; --config.rl.bc_weight=0.5

Upstream steps the cosine once per epoch; here it decays per optimizer update over the same span. The batch is
global: 64 scenes = upstream's 8 per GPU on one 8-GPU node (scale with the number of devices).
"""
import dataclasses

import ml_collections

from recogdrive_jax import configs
from recogdrive_jax.rl import grpo

EPOCHS = 10


def get_config():
    c = configs.planner_stage_config("rl", variant="small", vlm_size="large")
    c.rl = ml_collections.ConfigDict(dataclasses.asdict(grpo.GRPOConfig()))
    c.data.num_train_scenes = 10_000
    c.data.num_eval_scenes = 512
    c.train.batch_size = 64
    c.train.num_steps = EPOCHS * c.data.num_train_scenes // c.train.batch_size
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.train.ema_decay = 0.0  # the RL stage evaluates and saves the policy itself
    c.train.init_from = ""  # required: the il workdir (EMA params) or a converted parameter checkpoint
    c.optim.update(dict(lr=1e-4, warmup_ratio=0.0, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0,
                        weight_decay=1e-4, b1=0.9, b2=0.95, clip_norm=1.0))
    c.eval.deterministic = False  # upstream evaluates with the stochastic sampler (eta 1)
    c.eval.use_ema = False
    return c
