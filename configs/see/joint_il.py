"""Joint IL (issue 18, deliverable 2): the tiny InternVL and the tiny4 DiT trained together from the rendered front
camera and the driving prompt, no cache — the planner's loss backpropagates into the LLM (`il_joint` stage).

Scored like `il` on the held-out eval split (data.scene_seed 0: the same scenes as configs/see/cache_il.py's rows
when NUM_EVAL_SCENES match) with PDMS / EPDMS / ADE next to constant velocity:

  python -m recogdrive_jax.main --config=configs/see/joint_il.py --workdir=runs/see/joint_s0 --config.seed=0
  # start from the SFT'd VLM of the cache-IL evidence instead of random init:
  python -m recogdrive_jax.main --config=configs/see/joint_il.py --workdir=runs/see/joint_s0 \
      --config.model.init_from=runs/see/s0/sft
  # which LLM parts train; the auxiliary LM loss on the trajectory answer:
  ... --config.joint.train_llm=last_n --config.joint.last_n=1 --config.joint.lm_loss_weight=0.1

Its checkpoint feeds the other stages: `cache --config.model.init_from=<workdir>` (the joint VLM's states), then
`eval --config.eval.checkpoint=<workdir>/planner --config.data.cache_dir=<cache>` or
`rl --config.train.init_from=<workdir>/planner --config.data.cache_dir=<cache>` (the VLM frozen: states computed once
per scene). Use the same `prompt` values for the cache (here: 1 tile, no system message, the ego-status line).
"""
from recogdrive_jax.stage_configs import il_joint_stage_config

NUM_TRAIN_SCENES, NUM_EVAL_SCENES = 1500, 256
STEPS = 100  # batch 32: about the wall-clock of cache + 600 cache-IL steps on a loaded 2-core CPU


def get_config():
    c = il_joint_stage_config(variant="tiny", planner_variant="tiny4")
    c.model.dtype = "float32"  # CPUs have no fast bf16 matmuls
    c.model.remat = False  # tiny: recomputation only costs time
    c.planner.use_vl_mask = True  # prompt lengths vary: pool / attend over real tokens only (a cache pads differently)
    c.prompt.update(dict(max_dynamic_patch=1, use_thumbnail=False, system_message=""))  # one 56 px tile, short rows
    c.data.update(dict(num_train_scenes=NUM_TRAIN_SCENES, num_eval_scenes=NUM_EVAL_SCENES, scene_seed=0))
    c.train.update(dict(num_steps=STEPS, batch_size=32, log_every=10, eval_every=0, checkpoint_every=50))
    c.optim.update(dict(lr=1e-3, warmup_ratio=0.05))
    c.eval.update(dict(batch_size=64, num_plots=4))
    return c
