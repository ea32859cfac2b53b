"""Evaluate a V-IRL policy (an SFT or PPO run workdir) on in-distribution, rule-OOD and visual-OOD splits
(spec/virl.md §3: ID = 48 of the 1k training routes, rule OOD = the same routes with relative actions, visual OOD
= VLN-mini replica 9 styles × 2), verify_iter 2, max_new_tokens 256.

  python -m recogdrive_jax.main --config=configs/virl/eval_nav.py --workdir=runs/eval_ppo \
      --config.eval_nav.checkpoint=runs/virl_ppo
  python -m recogdrive_jax.main --config=configs/virl/eval_nav.py:tiny --workdir=/tmp/eval \
      --config.eval_nav.checkpoint=/tmp/ppo_tiny
"""

from recogdrive_jax import configs

common = configs.load_config_file("_common.py", relative_to=__file__)


def get_config(arg=None):
    variant = common.variant_of(arg)
    c = common.base("eval_nav", variant)
    del c.train, c.optim                     # evaluation only
    return c
