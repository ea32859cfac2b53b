"""Stage `pipeline`: runs several stages in order, each in `WORKDIR/<name>`, e.g. the demo's SFT → cache → IL → RL → eval.

`config.pipeline.steps` lists `name` or `name:stage` entries; `config.pipeline.configs.<name>` holds each
step's full config (the common keys are inherited from the top level unless the step sets them). String
values may contain `{workdir}` (the pipeline's workdir), which is how a step points at an earlier one's
output, e.g. `train.init_from = '{workdir}/il'`. Finished steps are skipped on a rerun because each stage
resumes from its own checkpoints, so the pipeline as a whole resumes too.
"""
from __future__ import annotations

import json
import os

import ml_collections

from recogdrive_jax import configs


def _fill_workdir(node, workdir: str):
    for key in list(node.keys()):
        value = node[key]
        if isinstance(value, ml_collections.ConfigDict):
            _fill_workdir(value, workdir)
        elif isinstance(value, str) and "{workdir}" in value:
            node[key] = value.replace("{workdir}", workdir)


def step_config(config, name: str) -> ml_collections.ConfigDict:
    if name not in config.pipeline.configs:
        raise configs.ConfigError(f"config.pipeline.configs.{name}: missing; config.pipeline.steps names it")
    sub = ml_collections.ConfigDict(config.pipeline.configs[name].to_dict())
    for key in ("seed", "mesh", "parallel", "distributed"):
        if key not in sub and key in config:
            sub[key] = config[key]
    return sub


def run(config, workdir: str) -> dict:
    from recogdrive_jax.stages import get_stage
    results = {}
    steps = [s for s in config.pipeline.steps.split(",") if s] if isinstance(config.pipeline.steps, str) else list(config.pipeline.steps)
    subs = []
    for entry in steps:  # validate every step before running the first
        name = entry.split(":")[0]
        sub = step_config(config, name)
        _fill_workdir(sub, workdir)
        configs.validate_common(sub)
        subs.append((name, sub))
    for name, sub in subs:
        print(f"=== pipeline step {name} (stage {sub.stage}) -> {os.path.join(workdir, name)}", flush=True)
        results[name] = get_stage(sub.stage)(sub, os.path.join(workdir, name)) or {}
    summary = {k: {m: v for m, v in r.items() if isinstance(v, (int, float, str))} for k, r in results.items()}
    with open(os.path.join(workdir, "pipeline_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return results
