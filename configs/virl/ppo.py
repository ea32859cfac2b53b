"""VLM-PPO on V-IRL (spec/virl.md §2): 15 updates × 256 steps × 8 processes, 4 epochs, 2 minibatches of 128
accumulated samples per process, clip 0.1, value coef 0.5, grad-norm 0.01, Adam lr 1e-7 eps 1e-7, cosine T_max=20
to 1e-9 stepped once per update, γ 0.9, λ 0.95, T = 0.2. Start from an early SFT checkpoint:

  python -m recogdrive_jax.main --config=configs/virl/ppo.py --workdir=runs/virl_ppo \
      --config.model.init_from=runs/virl_sft
  python -m recogdrive_jax.main --config=configs/virl/ppo.py:tiny --workdir=/tmp/ppo_tiny    # CPU minutes
"""

from recogdrive_jax import configs

common = configs.load_config_file("_common.py", relative_to=__file__)


def get_config(arg=None):
    variant = common.variant_of(arg)
    tiny = variant == "tiny"
    c = common.base("ppo", variant)
    c.ppo = common.ppo_block(tiny)
    processes = 1 if tiny else 8
    c.train.num_steps = 8 if tiny else 15                  # PPO updates
    c.train.batch_size = c.ppo.num_envs * c.ppo.num_steps * processes
    c.train.log_every = 1
    c.train.checkpoint_every = 1
    c.train.keep_checkpoints = 2
    c.train.tensorboard = False
    c.optim.update(dict(
        lr=2e-4 if tiny else 1e-7, eps=1e-7, b1=0.9, b2=0.999, weight_decay=0.0, clip_norm=0.01,
        schedule="cosine", warmup_ratio=0.0, cosine_steps=20, min_lr_ratio=1e-2,  # 1e-9 / 1e-7
        optimizer_steps_per_step=c.ppo.epochs * c.ppo.num_minibatches))
    return c
