"""Stage 1 for ReCogDrive-2B: InternVL3-2B driving SFT with upstream's recipe
(`internvl3_2b_dynamic_res_2nd_finetune_recogdrive_pretrain.sh`, seed 000): lr 4e-5 cosine, warmup 0.1, weight
decay 0.05, bf16, gradient checkpointing, max 12288 tokens, up to 16 tiles + thumbnail, drop path 0.1, global
batch 128 with per-device batch 1 (grad accumulation derived from the device count), ZeRO-1, 3 epochs.

  python -m recogdrive_jax.main --config=configs/recogdrive_2b/sft.py --workdir=runs/sft2b \
      --config.model.init_from=/ckpt/InternVL3-2B --config.data.meta_path=/data/recogdrive_pretrain.json
"""
from recogdrive_jax.stages.sft import sft_stage_config


def get_config():
    c = sft_stage_config(variant="internvl3_2b")
    c.model.init_from = ""  # set to the InternVL3-2B HF directory (random init otherwise)
    c.model.drop_path_rate = 0.1
    c.data.max_seq_length = 12288
    c.data.max_dynamic_patch = 16
    c.data.per_device_batch_size = 1
    c.data.num_epochs = 3
    c.data.num_workers = 8
    c.train.batch_size = 128
    c.optim.grad_accum = 16  # overridden from per_device_batch_size and the device count at start-up
    c.train.log_every = 1
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    return c
