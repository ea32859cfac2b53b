"""The OpenTrackVLA recipe (issue 18, deliverable 3; seed 002) as an `il_joint` head: the tiny InternVL's ViT (standing
in for the seed's precomputed DINO+SigLIP features) pooled to 4 coarse tokens per history frame (3 past front-camera
frames rendered from the world's past states) and 64 fine tokens for the current frame, TVI embeddings, a learned
[ACT] token last, the LLM on `inputs_embeds`, a 3-layer MLP head on the [ACT] state with tanh x alpha (alpha_xy = the
training futures' 95th percentile), masked MSE x beta_nav = 10, AdamW (wd 0.01, clip 1.0).

Default as the seed's model.py: LLM frozen; projector (mlp1), TVI, [ACT] and head trained. The unfrozen-LLM row:

  python -m recogdrive_jax.main --config=configs/see/opentrackvla.py --workdir=runs/see/otvla_frozen_s0 --config.seed=0
  python -m recogdrive_jax.main --config=configs/see/opentrackvla.py --workdir=runs/see/otvla_llm_s0 --config.seed=0 \
      --config.joint.train_llm=all
  # bf16 compute (params stay fp32): --config.model.dtype=bfloat16; from an SFT'd VLM: --config.model.init_from=...

Scored on the same held-out eval split as `il` (data.scene_seed 0), PDMS / EPDMS / ADE next to constant velocity.
"""
from recogdrive_jax.stage_configs import il_joint_stage_config

NUM_TRAIN_SCENES, NUM_EVAL_SCENES = 1500, 256
STEPS = 100  # batch 32: about the wall-clock of cache + 600 cache-IL steps on a loaded 2-core CPU


def get_config():
    c = il_joint_stage_config(variant="tiny", planner_variant="tiny4")
    c.model.dtype = "float32"  # CPUs have no fast bf16 matmuls
    c.model.remat = False
    c.model.vit = {"image_size": 224}  # 16x16 patches -> 8x8 pixel-shuffled grid = the 64 fine tokens
    c.joint.update(dict(head="opentrackvla", train_llm="none", history_frames=3, coarse_tokens=4, fine_tokens=64,
                        alpha_xy=-1.0))
    c.planner.update(dict(kind="mlp", beta_nav=10.0, mlp_hidden=256))
    c.prompt.update(dict(system_message=""))
    c.data.update(dict(num_train_scenes=NUM_TRAIN_SCENES, num_eval_scenes=NUM_EVAL_SCENES, scene_seed=0))
    c.train.update(dict(num_steps=STEPS, batch_size=32, log_every=10, eval_every=0, checkpoint_every=50))
    c.optim.update(dict(lr=3e-4, weight_decay=0.01, clip_norm=1.0, b2=0.999, warmup_ratio=0.05, min_lr_ratio=0.0))
    c.export.at_end = False  # the LLM is frozen by default: nothing new to export to HF
    c.eval.update(dict(batch_size=64, num_plots=4))
    return c
