"""The real NAVSIM data path end to end on a tiny fake split: NAVSIM-layout logs + JPEG sensor blobs written from the
synthetic world -> `navsim_convert` (convert navsim-logs) -> cache (tiny random VLM, NAVSIM prompt with ego status)
-> il -> rl -> eval (metrics.json + NAVSIM's result CSV, eval/test/navsim_pdm_score.csv).

  python -m recogdrive_jax.main --config=configs/navsim_fake.py --workdir=runs/navsim_fake

For real NAVSIM data, give the `navsim` step the NAVSIM roots instead of `fake` (see stages/navsim_convert.py):
  --config.pipeline.configs.navsim.navsim.fake=false --config.navsim.logs_dir=/data/navsim_logs
  --config.navsim.sensor_blobs_dir=/data/sensor_blobs --config.navsim.metric_cache=/data/metric_cache_converted
and a fine-tuned VLM for the cache (--config.model.init_from=runs/sft8b) and bigger il/rl settings.
"""
import dataclasses

import ml_collections

from recogdrive_jax import configs, stage_configs
from recogdrive_jax.rl import grpo

STEPS = ("navsim", "cache", "il", "rl", "eval")
TINY_VLM_HIDDEN = 64
NAVSIM = dict(source="navsim", navsim_dir="{workdir}/navsim")


def _planner(stage: str) -> ml_collections.ConfigDict:
    c = configs.planner_stage_config(stage, variant="tiny")
    c.data.update(NAVSIM)
    c.data.cache_dir = "{workdir}/cache"
    c.planner.vl_dim = TINY_VLM_HIDDEN
    c.eval.batch_size = 8
    c.eval.num_plots = 1
    if "train" in c:
        c.train.update(dict(num_steps=2, batch_size=8, log_every=1, eval_every=0, checkpoint_every=0, tensorboard=False))
    return c


def step_configs() -> dict:
    conv = stage_configs.navsim_convert_config()
    conv.navsim.fake = True
    cache = stage_configs.cache_stage_config()
    cache.model.variant = "tiny"
    cache.model.dtype = "float32"
    cache.model.remat = False
    cache.data.update(NAVSIM)
    cache.cache.update(dict(splits="train,eval,test", batch_size=8, max_dynamic_patch=2))
    il = _planner("il")
    rl = _planner("rl")
    rl.rl = ml_collections.ConfigDict(dataclasses.asdict(grpo.GRPOConfig(group_size=2)))
    rl.train.num_steps = 1
    rl.train.init_from = "{workdir}/il"
    rl.train.ema_decay = 0.0
    rl.eval.use_ema = False
    ev = _planner("eval")
    del ev["train"]
    del ev["optim"]
    ev.eval.checkpoint = "{workdir}/rl"
    ev.eval.split = "test"
    ev.eval.use_ema = False
    return {"navsim": conv, "cache": cache, "il": il, "rl": rl, "eval": ev}


def get_config(arg: str | None = None):
    steps = tuple(s for s in (arg or ",".join(STEPS)).split(",") if s)
    return configs.pipeline_config(steps, step_configs(), source="configs/navsim_fake.py")
