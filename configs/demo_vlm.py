"""The demo's VLM steps: SFT of the tiny InternVL on synthetic driving QA (about a minute on 2 CPU cores, loss
visibly falling), then the hidden-state cache of the planner's scenes, then IL on that cache.

`il_vlm` is below the constant-velocity baseline, and cannot get above it inside the CI budget: PDMS 0.651 vs
CV 0.807 (seed 0, 128 held-out scenes, 2026-12-07). Why (measured the same day with the prompt before it had the
ego-status line, where il_vlm scored 0.679):
* each step on the cache costs ~7x a scene-token step (the memory is the whole ~390-token prompt, not ~40 scene
  tokens: 0.58 vs 0.08 s per batch-128 step, loaded 2-core machine), so the budget affords 400 steps, and at 400
  steps IL is below CV on scene tokens too (0.735 vs the cache's 0.679);
* at 1,500 steps the cache reaches 0.795 (0.68 / 0.805 at 500 / 1,000) and the same planner with all-zero states
  0.798 (0.709 / 0.774), with another scene's states 0.792 (0.681 / 0.798): the 30-step VLM (loss 6.0 -> 4.0)
  carries nothing the planner uses beyond the ego status and history it gets anyway (a linear probe agrees: its
  states lower the ADE of ego + history by 0.06 m).
What would make it see: a VLM that learned the trajectory QA (configs/see/cache_il.py, longer SFT, with the
shuffled / zeroed controls, `data.vl_features`).

Meant to be merged into configs/demo.py's pipeline (each step runs in WORKDIR/<name>; `{workdir}` is the
pipeline's workdir):

    pipeline.steps = 'sft,cache,il_vlm'
    pipeline.configs = {'sft': sft_config(), 'cache': cache_config(), 'il_vlm': il_on_cache(<demo.py il_config()>)}

Run on its own:
  python -m recogdrive_jax.main --config=configs/demo_vlm.py --workdir=workdir/demo_vlm
  python -m recogdrive_jax.main --config=configs/demo_vlm.py:sft --workdir=workdir/demo_vlm
"""
import ml_collections

from recogdrive_jax import configs
from recogdrive_jax.stage_configs import cache_stage_config, sft_stage_config

TINY_VLM_HIDDEN = 64  # models/internvl.VARIANTS['tiny'].llm_config.hidden_size
# The planner scenes the cache covers (the first scenes of the il step's training split, the whole eval split).
NUM_TRAIN_SCENES, NUM_EVAL_SCENES = 1500, 128


def sft_config() -> ml_collections.ConfigDict:
    c = sft_stage_config("tiny")
    c.model.remat = False  # tiny: recomputation only costs time
    c.model.dtype = "float32"  # CPUs have no fast bf16 matmuls, and fp32 compiles in half the time
    c.data.synthetic_scenes = 60  # -> ~530 QA rows (perception, prediction, planning, cognitive, trajectory)
    c.data.synthetic_eval_scenes = 8
    c.data.max_dynamic_patch = 6  # the tiny ViT's 56 px tiles: front camera -> 6 + thumbnail
    c.data.max_seq_length = 512
    c.data.system_message = ""  # no system turn: shorter rows for a CPU demo
    c.data.pack = True  # packed rows of 512 tokens / 24 tiles: one static shape, one compilation
    c.data.length_buckets = (512,)
    c.data.tile_buckets = (24,)
    c.train.num_steps = 30
    c.train.batch_size = 8
    c.train.log_every = 5
    c.train.eval_every = 30
    c.train.checkpoint_every = 15
    c.optim.lr = 3e-3
    c.optim.warmup_ratio = 0.1
    c.eval.max_batches = 2
    return c


def cache_config() -> ml_collections.ConfigDict:
    c = cache_stage_config()
    c.model.init_from = "{workdir}/sft"
    c.model.dtype = "float32"
    c.data.num_train_scenes = NUM_TRAIN_SCENES
    c.data.num_eval_scenes = NUM_EVAL_SCENES
    c.cache.batch_size = 32
    c.cache.max_dynamic_patch = 6  # as the SFT step
    c.cache.system_message = ""  # the driving prompt without a system turn, as the SFT trajectory rows
    return c


def il_on_cache(c: ml_collections.ConfigDict, cache_step: str = "cache") -> ml_collections.ConfigDict:
    """An il config (configs/demo.py's) reading the cache step's hidden states (Hv = the tiny VLM's width); shorter,
    since it only shows the cache path."""
    c = ml_collections.ConfigDict(c.to_dict())
    c.data.cache_dir = "{workdir}/" + cache_step
    c.data.num_train_scenes, c.data.num_eval_scenes = NUM_TRAIN_SCENES, NUM_EVAL_SCENES  # what the cache holds
    c.planner.vl_dim = TINY_VLM_HIDDEN
    c.train.num_steps = 400
    c.train.eval_every = 0
    c.train.checkpoint_every = 200
    return c


STEPS = ("sft", "cache", "il_vlm")


def get_config(arg: str | None = None):
    steps = tuple(s for s in (arg or ",".join(STEPS)).split(",") if s)
    demo = configs.load_config_file("demo.py", relative_to=__file__)
    step_configs = {"sft": sft_config(), "cache": cache_config(), "il_vlm": il_on_cache(demo.il_config())}
    return configs.pipeline_config(steps, step_configs, source="configs/demo_vlm.py")
