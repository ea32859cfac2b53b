"""Hidden-state cache for ReCogDrive-2B: the fine-tuned InternVL3-2B (Hv 1536) over every trajectory sample's driving
prompt (front camera, 4-pose history, navigation command; upstream caches with max 12 tiles), per split.

  python -m recogdrive_jax.main --config=configs/recogdrive_2b/cache.py --workdir=runs/cache2b \
      --config.model.init_from=runs/sft2b
  python -m recogdrive_jax.main --config=configs/recogdrive_2b/il.py --workdir=runs/il2b --config.data.cache_dir=runs/cache2b

`--config.cache.layout=upstream_compatible` writes upstream's layout (left-padded to 2800 tokens, fp32).
"""
from recogdrive_jax.stages.cache import cache_stage_config


def get_config():
    c = cache_stage_config()
    c.model.init_from = ""  # the sft workdir (or an HF directory of a ReCogDrive VLM)
    c.model.dtype = "bfloat16"
    c.data.num_train_scenes = 10_000  # the same scenes configs/recogdrive_2b/il.py trains on
    c.data.num_eval_scenes = 512
    c.cache.batch_size = 8
    c.cache.max_dynamic_patch = 12
    return c
