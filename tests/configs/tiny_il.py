"""The smallest `il` run (tiny DiT, a few synthetic scenes, 2 steps, no plots): for storage and CLI tests."""
from recogdrive_jax import configs


def get_config():
    c = configs.planner_stage_config("il", variant="tiny")
    c.train.update(dict(num_steps=2, batch_size=8, log_every=1, checkpoint_every=1, eval_every=0, ema_decay=0.0,
                        tensorboard=True, keep_checkpoints=2))
    c.data.update(dict(num_train_scenes=8, num_eval_scenes=8))
    c.eval.update(dict(batch_size=8, num_plots=1))
    return c
