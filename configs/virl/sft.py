"""SFT baseline / RL init on expert V-IRL answers (spec/virl.md §4 "SFT data"): single-turn oracle answers
(observation, gt sentence, gt action) over the training routes with several rail redraws, loss on the answer and
EOS. Upstream recipe for VL: full fine-tune, lr 5e-7, cosine with 3 % warmup, batch 128, 5 epochs.

  python -m recogdrive_jax.main --config=configs/virl/sft.py --workdir=runs/virl_sft \
      --config.train.init_from=runs/internvl3_2b_params --config.model.tokenizer=/path/to/internvl3_2b
  python -m recogdrive_jax.main --config=configs/virl/sft.py:tiny --workdir=/tmp/sft_tiny   # CPU minutes

Runs in stage `ppo` with `algo='sft'` (the same policy tree, prompt layout and evaluation).
"""

import ml_collections

from recogdrive_jax import configs

common = configs.load_config_file("_common.py", relative_to=__file__)


def get_config(arg=None):
    variant = common.variant_of(arg)
    tiny = variant == "tiny"
    c = common.base("ppo", variant)
    c.algo = "sft"
    c.ppo = common.ppo_block(tiny)          # unused by SFT; kept so one workdir's config.json is complete
    c.sft = ml_collections.ConfigDict(dict(num_routes=0, rail_redraws=4 if tiny else 15, seed=0))
    c.prompt.max_prompt_len = 768 if tiny else 4096        # single-turn prompts only (longer ones are skipped)
    c.train.num_steps = 300 if tiny else 600               # 1k routes × 15 redraws ≈ 15k pairs × 5 epochs / 128
    c.train.batch_size = 16 if tiny else 128
    c.train.log_every = 25 if tiny else 10
    c.train.checkpoint_every = 100 if tiny else 100
    c.train.keep_checkpoints = 3
    c.train.tensorboard = False
    c.optim.update(dict(lr=2e-3 if tiny else 5e-7, warmup_ratio=0.03, schedule="cosine", weight_decay=0.0,
                        clip_norm=1.0, eps=1e-8, grad_accum=1 if tiny else 16))
    return c
