"""PDM evaluation of a ReCogDrive-8B planner checkpoint (or the constant-velocity baseline) on a split.

  python -m recogdrive_jax.main --config=configs/recogdrive_8b/eval.py --workdir=runs/eval8b \
      --config.eval.checkpoint=runs/rl8b --config.data.cache_dir=runs/cache8b
  python -m recogdrive_jax.main --config=configs/recogdrive_8b/eval.py --workdir=runs/eval_cv \
      --config.eval.baseline=constant_velocity

Writes WORKDIR/eval/<split>/metrics.json, metrics.md, per_scene.jsonl and BEV PNGs of the best/worst scenes.
`eval.deterministic=False` is upstream's stochastic evaluation (one eta = 1 sample per scene).
"""
from recogdrive_jax import configs


def get_config():
    c = configs.planner_stage_config("eval", variant="small", vlm_size="large")
    del c["train"]
    del c["optim"]
    c.data.num_eval_scenes = 512
    c.eval.split = "test"
    c.eval.deterministic = False
    c.eval.num_plots = 6
    return c
