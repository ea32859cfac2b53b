"""SFT baseline / RL init on expert V-IRL answers (spec/virl.md §4 "SFT data"), run by the shared `sft` stage:
single-turn oracle answers (observation, gt sentence, gt action) over the training routes with several rail
redraws (envs/sft_data.py writes them as InternVL chat JSONL into WORKDIR/virl_sft once), loss on the answer and
EOS, length-grouped batches. Upstream recipe for VL: full fine-tune, lr 5e-7, cosine with 3 % warmup, batch
128, 5 epochs. At the end (and every `train.eval_every`) the model is evaluated on `eval_nav.splits`.

  python -m recogdrive_jax.main --config=configs/virl/sft.py --workdir=runs/virl_sft \
      --config.model.init_from=/path/to/InternVL3-2B
  python -m recogdrive_jax.main --config=configs/virl/sft.py:tiny --workdir=/tmp/sft_tiny   # CPU minutes

Continue an SFT run (the SFT-scaling baseline) with `--config.model.init_from=<that sft workdir>`; start PPO
from it with configs/virl/ppo.py and the same flag.
"""

import ml_collections

from recogdrive_jax import configs, stage_configs

common = configs.load_config_file("_common.py", relative_to=__file__)


def get_config(arg=None):
    variant = common.variant_of(arg)
    tiny = variant == "tiny"
    c = common.base("sft", variant)
    c.data = stage_configs.data_block(
        max_seq_length=1024 if tiny else 4608,
        length_buckets=(512, 640, 768, 896, 1024) if tiny else (),
        max_dynamic_patch=6, use_thumbnail=True,      # InternVL3 chat defaults: the grid → 4 tiles + thumbnail
        system_message="__default__" if c.model.system_message else "",
        num_workers=1 if tiny else 2)
    c.virl_sft = ml_collections.ConfigDict(dict(num_routes=0, rail_redraws=4 if tiny else 15, seed=0))
    c.export = ml_collections.ConfigDict(dict(at_end=not tiny, each_eval=False, layout="native", dtype="bfloat16",
                                              max_shard_size="5GB"))
    c.eval = ml_collections.ConfigDict(dict(max_batches=0))
    # tiny: 781 pairs (16 routes × 4 redraws) ≈ 12 epochs; full: 1k routes × 15 redraws ≈ 15k pairs × 5 epochs / 128
    c.train.num_steps = 600
    c.train.batch_size = 16 if tiny else 128
    c.train.log_every = 25 if tiny else 10
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 3
    c.train.tensorboard = False
    c.optim.update(dict(lr=2e-3 if tiny else 5e-7, warmup_ratio=0.03, schedule="cosine", weight_decay=0.0,
                        clip_norm=1.0, eps=1e-8, grad_accum=1 if tiny else 16))
    return c
