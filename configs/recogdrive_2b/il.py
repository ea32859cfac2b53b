"""Stage 2 for ReCogDrive-2B: DiT `small` planner on InternVL3-2B hidden states (Hv 1536), upstream IL recipe.

  python -m recogdrive_jax.main --config=configs/recogdrive_2b/il.py --workdir=runs/il2b \
      --config.data.cache_dir=runs/cache2b
"""
from recogdrive_jax import configs


def get_config():
    c = configs.planner_stage_config("il", variant="small", vlm_size="small")
    c.train.num_steps = 200_000
    c.train.batch_size = 512
    c.train.log_every = 100
    c.train.eval_every = 5000
    c.train.checkpoint_every = 5000
    c.optim.warmup_ratio = 0.01
    c.data.num_train_scenes = 10_000
    c.data.num_eval_scenes = 512
    return c
