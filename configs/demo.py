"""The embedded default: the whole pipeline on tiny models and the procedurally generated driving world, on a
laptop CPU in minutes. `make demo` runs it; every step is the real stage code with small settings.

  sft     tiny InternVL SFT on synthetic driving QA (loss visibly falling)        configs/demo_vlm.py
  cache   its last hidden states over the planner's scenes, in TensorStore        configs/demo_vlm.py
  il_vlm  Stage 2 on that cache (its image tokens, whitened): PDMS 0.810-0.822 on 5 seeds vs the constant-velocity
          baseline's 0.807 inside the CI budget (raw states 0.796-0.820), held-out ADE 1.26-1.59 m vs 1.69-2.08 m
          with raw, zeroed or shuffled states (configs/demo_vlm.py; evidence command: configs/see/cache_il.py)
  il      Stage 2 on the fixed scene-token encoder; prints held-out PDMS vs the constant-velocity baseline
  rl      Stage 3 DiffGRPO from `il`'s EMA params                                 configs/demo_rl.py
  eval    the RL policy on the held-out test split (metrics.json / metrics.md / BEV PNGs)

  python -m recogdrive_jax.main --config=configs/demo.py --workdir=workdir/demo
  python -m recogdrive_jax.main --config=configs/demo.py:il,rl,eval --workdir=workdir/demo   # some steps only

Each step runs in WORKDIR/<step> and resumes from its own checkpoints, so rerunning continues where it stopped.
At the end the pipeline prints each step's wall time (also in WORKDIR/pipeline_summary.json).

Overrides apply to every step that has the key (a key no step has is an error naming it):
  --config.train.num_steps=2 --config.optim.lr=1e-3          # every training step (sft, il_vlm, il, rl)
  --config.pipeline.configs.il.train.num_steps=2              # the il step only
A top-level override wins over a step's own value (see recogdrive_jax/stages/pipeline.py).
"""
import ml_collections

from recogdrive_jax import configs

STEPS = ("sft", "cache", "il_vlm", "il", "rl", "eval")


def il_config() -> ml_collections.ConfigDict:
    """IL of the tiny4 DiT on scene tokens: enough steps to beat the constant-velocity baseline."""
    c = configs.planner_stage_config("il", variant="tiny4")
    c.train.num_steps = 1500
    c.train.batch_size = 128
    c.train.log_every = 100
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.ema_decay = 0.99
    c.optim.lr = 2e-3
    c.optim.warmup_ratio = 0.05
    c.data.num_train_scenes = 3000
    c.data.num_eval_scenes = 128
    c.eval.num_plots = 4
    return c


def get_config(arg: str | None = None):
    steps = tuple(s for s in (arg or ",".join(STEPS)).split(",") if s)
    vlm = configs.load_config_file("demo_vlm.py", relative_to=__file__)
    rl = configs.load_config_file("demo_rl.py", relative_to=__file__)
    step_configs = {"sft": vlm.sft_config(), "cache": vlm.demo_cache_config(),
                    "il_vlm": vlm.il_vlm_config(il_config()),
                    "il": il_config(), "rl": rl.rl_config(), "eval": rl.eval_config()}
    return configs.pipeline_config(steps, step_configs, source="configs/demo.py")
