"""Demo pipeline steps after `il`: DiffGRPO (`rl`) from the IL run's EMA params, then `eval` of the RL policy on the
held-out test split. Tiny planner ('tiny4'), synthetic world; together about a minute and a half on 2 CPU cores.

`configs/demo.py` adds them to its pipeline:  pipeline.configs.rl = rl_config(), pipeline.configs.eval =
eval_config(). One step alone (after the demo's il step has run in WORKDIR/il):

  python -m recogdrive_jax.main --config=configs/demo.py:il,rl,eval --workdir=workdir/demo
"""
import dataclasses

import ml_collections

from recogdrive_jax import configs
from recogdrive_jax.rl import grpo

VARIANT = "tiny4"


def rl_config(bc_weight: float = 0.1) -> ml_collections.ConfigDict:
    c = configs.planner_stage_config("rl", variant=VARIANT)
    c.rl = ml_collections.ConfigDict(dataclasses.asdict(grpo.GRPOConfig(group_size=8, bc_weight=bc_weight)))
    c.train.init_from = "{workdir}/il"  # the il step's workdir: its EMA params; also the frozen reference
    c.train.num_steps = 30
    c.train.batch_size = 16  # scenes per step (x G = 8 chains each)
    c.train.log_every = 5
    c.train.eval_every = 0  # held-out eval at the end (and of the reference at the start)
    c.train.checkpoint_every = 15
    c.train.ema_decay = 0.0
    c.optim.update(dict(lr=2e-4, warmup_ratio=0.0, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0,
                        weight_decay=1e-4, b1=0.9, b2=0.95, clip_norm=1.0))
    c.data.num_train_scenes = 480  # the first 480 of the il step's training scenes (same seeds)
    c.data.num_eval_scenes = 128
    c.eval.use_ema = False
    c.eval.num_plots = 4
    return c


def eval_config() -> ml_collections.ConfigDict:
    c = configs.planner_stage_config("eval", variant=VARIANT)
    del c["train"]
    del c["optim"]
    c.eval.checkpoint = "{workdir}/rl"
    c.eval.split = "test"
    # both evaluation protocols on the same seeded noise: deterministic DDIM (eta 0; the headline, as the il/rl
    # steps evaluate) and upstream's stochastic get_action sampling (eta 1), one row each in metrics.md
    c.eval.protocol = "deterministic,upstream"
    c.eval.use_ema = False
    c.eval.num_plots = 4
    c.data.num_eval_scenes = 128
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Standalone use (outside the pipeline `{workdir}` is not filled: pass the paths), e.g. the BC-0 ablation:

      python -m recogdrive_jax.main --config=configs/demo_rl.py:rl --workdir=workdir/demo/rl_bc0 \\
          --config.train.init_from=workdir/demo/il --config.rl.bc_weight=0
      python -m recogdrive_jax.main --config=configs/demo_rl.py:eval --workdir=workdir/demo/eval_bc0 \\
          --config.eval.checkpoint=workdir/demo/rl_bc0
    """
    steps = {"rl": rl_config, "eval": eval_config}
    if (arg or "rl") not in steps:
        raise ValueError(f"configs/demo_rl.py: unknown step {arg!r}; allowed: {sorted(steps)}")
    c = steps[arg or "rl"]()
    if arg == "eval":
        c.eval.checkpoint = ""
    else:
        c.train.init_from = ""
    return c
