"""The embedded default: the whole pipeline on tiny models and the procedurally generated driving world, on a
laptop CPU in minutes. `make demo` runs it; every step is the real stage code with small settings.

  python -m recogdrive_jax.main --config=configs/demo.py --workdir=workdir/demo
  python -m recogdrive_jax.main --config=configs/demo.py:il --workdir=workdir/demo_il   # one step only
"""
import ml_collections

from recogdrive_jax import configs

STEPS = ("il",)


def il_config() -> ml_collections.ConfigDict:
    c = configs.planner_stage_config("il", variant="tiny4")
    c.train.num_steps = 1500
    c.train.batch_size = 128
    c.train.log_every = 100
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.ema_decay = 0.99
    c.optim.lr = 2e-3
    c.optim.warmup_ratio = 0.05
    c.data.num_train_scenes = 3000
    c.data.num_eval_scenes = 128
    c.eval.num_plots = 4
    return c


def get_config(arg: str | None = None):
    steps = tuple(s for s in (arg or ",".join(STEPS)).split(",") if s)
    c = configs.base_config()
    c.stage = "pipeline"
    c.pipeline = ml_collections.ConfigDict()
    c.pipeline.steps = ",".join(steps)
    c.pipeline.configs = ml_collections.ConfigDict({"il": il_config()})
    unknown = [s for s in steps if s not in c.pipeline.configs]
    if unknown:
        raise ValueError(f"configs/demo.py: unknown step(s) {unknown}; allowed: {sorted(c.pipeline.configs)}")
    return c
