"""Evidence for "planners that see" (issue 18, deliverable 1): does IL on the VLM cache win *because of the features*?

One pipeline per seed; every row is scored on the same NUM_EVAL_SCENES fixed held-out scenes (data.scene_seed 0,
the eval split), whatever the seed:

  sft          the tiny InternVL on the synthetic driving QA (trajectory rows: front camera + history + ego status
               + command -> future waypoints, as upstream's Stage 1), longer than the demo's 30 steps
  cache        its last hidden states of the planner's train and eval scenes (the same prompt)
  cv           constant velocity (no training)
  il_tokens    the same DiT planner on the fixed scene-token encoder (what a VLM that carries the scene could give)
  il_real      IL on the cache
  il_shuffled  IL on the cache, each scene given another scene's states (data.vl_features='shuffled', a fixed
               derangement in train and eval alike)
  il_zeros     IL on the cache with all-zero states (ego status + history alone)

Each il row prints "held-out PDMS x vs constant-velocity baseline y" and writes WORKDIR/<row>/eval/eval/metrics.json.
"Beats" = the paired mean difference over seeds exceeds 2 sd (issue 18). One command per seed, or per row:

  python -m recogdrive_jax.main --config=configs/see/cache_il.py --workdir=runs/see/s0 --config.seed=0
  python -m recogdrive_jax.main --config=configs/see/cache_il.py:sft,cache,il_shuffled --workdir=runs/see/s1 --config.seed=1
  python -m recogdrive_jax.main --config=configs/see/cache_il.py:cv --workdir=runs/see/cv

`--config.seed` reaches every step (the VLM's SFT, the planner's init and batches); the scenes stay fixed.

Does the SFT'd VLM know the trajectory? The sft step's eval asks it the trajectory question on TRAJECTORY_SCENES
held-out scenes (the planner's eval split), greedy text, parsed strictly (vlm/trajectory_eval.py; WORKDIR/sft/
eval_trajectory/{metrics.json, answers.jsonl}). On a finished sft workdir the same command with
`--config.eval.trajectory_scenes=N` trains nothing and runs that eval. Measured 2026-12-07 (5f8e5e7, seed 0, 64
scenes, loaded 2-core machine; CV ADE 2.549 m / FDE 6.535 m; the history-only reference — least squares from the
prompt's text (past poses, ego status, command) fitted on the 300 SFT scenes — ADE 1.763 m / FDE 4.722 m):
  the demo's 30 steps (configs/demo_vlm.py) parsed 0/64: every answer '.0000...'; 2.5 min
  150 steps, max_seq_length 512 (before)  parsed 0/64: every answer '[PT, 0.000...' (no '(' ever); 4 min
  150 steps, 640 tokens (now)             parsed 0/64, the same answers; 6 min
  600 steps, 640 tokens                   parsed 64/64 (98% at step 400), ADE 6.28 m / FDE 10.99 m: 2.5x CV's; 39
                                          distinct answers, all straight (y = h = 0.00) with x not monotonic; 17 min
The tiny VLM does not know the trajectory: after 600 steps it has learned the answer's format, not its content
(not even the history and speed it is given as text), so the cache cannot carry a trajectory for IL to read.
The 512 tokens of the demo's SFT cut every ~600-token trajectory row after ~3 of its 8 poses (the list's end and
the stop were never trained); this step now uses 640.
"""
import ml_collections

from recogdrive_jax import configs

NUM_TRAIN_SCENES, NUM_EVAL_SCENES = 1500, 256
SFT_STEPS, SFT_SCENES = 150, 300  # 600 steps ran at 0.26 steps/s on the loaded machine: 40 min
TRAJECTORY_SCENES = 64  # held-out scenes the SFT'd VLM answers the trajectory question on (WORKDIR/sft/eval_trajectory)
IL_STEPS = 600  # sized to 3 seeds x every row on a loaded 2-core CPU in ~90 min (configs/see/evidence.sh)
STEPS = ("sft", "cache", "cv", "il_tokens", "il_real", "il_shuffled", "il_zeros")


def _scenes(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.data.num_train_scenes, c.data.num_eval_scenes = NUM_TRAIN_SCENES, NUM_EVAL_SCENES
    c.data.scene_seed = 0
    return c


def sft_config(vlm) -> ml_collections.ConfigDict:
    c = vlm.sft_config()
    c.data.synthetic_scenes = SFT_SCENES  # ~5 QA rows a scene, trajectory rows twice
    c.data.synthetic_eval_scenes = 16
    # a trajectory row is ~600 tokens (456 prompt + ~145 answer): the demo's 512 cut it after ~3 of the 8 poses, so
    # the end of the list and the stop were never trained (the sft stage warns when the eval's rows do not fit)
    c.data.max_seq_length = 640
    c.data.length_buckets = (640,)
    c.train.num_steps = SFT_STEPS
    c.train.eval_every = SFT_STEPS // 3  # (each eval answers TRAJECTORY_SCENES prompts greedily: ~20 s on 2 cores)
    c.train.checkpoint_every = SFT_STEPS // 4
    c.train.log_every = 25
    c.optim.lr = 2e-3
    c.optim.warmup_ratio = 0.05
    c.eval.max_batches = 4
    c.eval.trajectory_scenes = TRAJECTORY_SCENES  # text-waypoint ADE vs CV (vlm/trajectory_eval.py) at each eval
    c.eval.trajectory_batch_size = 16
    return c


def il_config(demo, vlm, features: str | None) -> ml_collections.ConfigDict:
    """demo.py's IL (tiny4 DiT), IL_STEPS steps; `features` None = scene tokens, else the cache with that control."""
    c = demo.il_config() if features is None else vlm.il_on_cache(demo.il_config())
    c = _scenes(c)
    c.train.num_steps = IL_STEPS
    c.train.eval_every = 0
    c.train.checkpoint_every = 300
    c.eval.num_plots = 4
    if features is not None:
        c.data.vl_features = features
    return c


def cv_config(demo_rl) -> ml_collections.ConfigDict:
    c = _scenes(demo_rl.eval_config())
    c.eval.checkpoint = ""
    c.eval.baseline = "constant_velocity"
    c.eval.split = "eval"
    c.eval.protocol = "deterministic"
    return c


def get_config(arg: str | None = None):
    steps = tuple(s for s in (arg or ",".join(STEPS)).split(",") if s)
    demo = configs.load_config_file("../demo.py", relative_to=__file__)
    vlm = configs.load_config_file("../demo_vlm.py", relative_to=__file__)
    demo_rl = configs.load_config_file("../demo_rl.py", relative_to=__file__)
    step_configs = {"sft": sft_config(vlm), "cache": _scenes(vlm.cache_config()), "cv": cv_config(demo_rl),
                    "il_tokens": il_config(demo, vlm, None),
                    **{f"il_{f}": il_config(demo, vlm, f) for f in ("real", "shuffled", "zeros")}}
    return configs.pipeline_config(steps, step_configs, source="configs/see/cache_il.py")
