"""The smallest `sft` run (tiny InternVL, one 56-px tile and <= 256 tokens a row, 2 steps) for the CLI fault tests
(tests/test_faults.py); the meta JSON comes from `--config.data.meta_path`."""
from recogdrive_jax.stage_configs import sft_stage_config


def get_config():
    c = sft_stage_config("tiny")
    c.model.remat = False
    c.model.dtype = "float32"
    c.data.update(max_seq_length=256, max_dynamic_patch=1, use_thumbnail=False, length_buckets=(256,),
                  tile_buckets=(1,), system_message="", num_workers=1, prefetch=1)
    c.train.update(num_steps=2, batch_size=8, log_every=1, checkpoint_every=0, async_checkpoint=False,
                   tensorboard=False)
    c.export.at_end = False
    return c
