"""Stage `eval_nav`: V-IRL evaluation of a navigation policy (spec/virl.md §3) on the in-distribution, rule-OOD
and visual-OOD splits (the evaluation itself is `vlm/nav_eval.py`, shared with `ppo` and `sft`).

Writes `OUT/<split>/metrics.json` (`success_rate`, `per_step_accuracy`, `mean_reward`, `num_routes`, `steps`),
`OUT/<split>/episodes.jsonl` (per route), `OUT/<split>/episodes/ep_<k>.png` (the first `num_render` episodes as
strips of grid images with the gt action, the parsed output and the reward) and `OUT/results.md`.
OUT = WORKDIR/eval_nav. The checkpoint is `eval_nav.checkpoint` (a run workdir, e.g. an SFT or PPO run, or a
parameter directory).
"""
from __future__ import annotations


import jax

from recogdrive_jax import configs, provenance, storage
from recogdrive_jax.parallel import runtime as runtime_lib
from recogdrive_jax.rl import ppo as ppo_lib
from recogdrive_jax.train import checkpoint as ckpt_lib
from recogdrive_jax.vlm import nav_eval
from recogdrive_jax.vlm.nav_eval import METRIC_KEYS, flat_metrics, splits_of  # noqa: F401  (the stage's outputs)
from recogdrive_jax.vlm.nav_policy import NavModel, NavPolicy, load_vlm_params


def run(config, workdir: str) -> dict:
    config = configs.validate_common(config)
    ckpt = str(config.eval_nav.checkpoint or "")
    if not ckpt:
        raise configs.ConfigError("config.eval_nav.checkpoint: set it to a run workdir (sft / ppo), an HF "
                                  "InternVL directory or a `convert internvl` output")
    if not storage.exists(ckpt):
        raise FileNotFoundError(f"config.eval_nav.checkpoint={ckpt!r} does not exist")
    workdir = storage.abspath(workdir)  # a gs:// URL stays one: every output goes through `storage`
    storage.makedirs(workdir)
    provenance.write_config(config, workdir, extra={"scored": {"checkpoint": ckpt_lib.checkpoint_ref(ckpt)}})
    rt = runtime_lib.from_config(config)
    model = NavModel(config, workdir, source=ckpt)
    policy = NavPolicy(config, model.cfg, model.tokenizer)
    abstract = ppo_lib.str_keys(policy.vlm_mdef.abstract_params())
    params = load_vlm_params(model, policy, jax.tree.map(lambda _: rt.replicated(), abstract))
    results = nav_eval.evaluate(params, config, model.cfg, model.tokenizer, storage.join(workdir, "eval_nav"),
                                runtime=rt)
    if jax.process_index() == 0:
        for split, m in results.items():
            print(f"[eval_nav] {split}: success {m['success_rate']:.3f}  per-step {m['per_step_accuracy']:.3f}  "
                  f"mean reward {m['mean_reward']:+.3f}  ({m['num_routes']} routes)", flush=True)
    return nav_eval.flat_metrics(results)
