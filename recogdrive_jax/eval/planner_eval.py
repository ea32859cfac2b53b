"""Scoring planners on a split: PDM sub-metrics (sim/pdm.py), ADE/FDE, a Markdown table and BEV plots.

Shared by the `il` stage's periodic evaluation, the `rl` stage and the `eval` stage, so a number printed by any
of them means the same thing.
"""
from __future__ import annotations

import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from recogdrive_jax import storage
from recogdrive_jax.configs import ConfigError
from recogdrive_jax.sim import pdm

# Reported keys (the eval stage's metrics.json), in table order.
REPORT_KEYS = ("nc", "dac", "ddc", "ttc", "ep", "comfort", "pdms", "epdms", "ade", "fde", "num_scenes")
_PDM_KEYS = {"nc": "nc", "dac": "dac", "ddc": "ddc", "ttc": "ttc", "ep": "ep", "comfort": "c", "pdms": "pdms",
             "epdms": "epdms"}


def score_plans(split, trajectories: np.ndarray, chunk: int = 64, **pdm_kwargs) -> dict[str, np.ndarray]:
    """Per-scene metrics of one plan per scene: trajectories [N, 8, 3] → {key: [N]} (PDM keys + ade, fde)."""
    n = len(split)
    trajectories = np.asarray(trajectories, np.float32)
    if trajectories.shape != (n, 8, 3):
        raise ValueError(f"score_plans: trajectories of shape {trajectories.shape}, expected {(n, 8, 3)}")
    out: dict[str, list] = {k: [] for k in _PDM_KEYS}
    chunk = min(chunk, n)
    from recogdrive_jax.train.metrics import track
    for start in track(range(0, n, chunk), desc=f"pdm score {n} scenes", unit="batches"):
        idx = np.arange(start, min(start + chunk, n))
        pad = np.concatenate([idx, np.full(chunk - len(idx), idx[-1])])  # fixed shape: one compilation
        res = pdm.pdm_score(split.scene_batch(pad), jnp.asarray(trajectories[pad])[:, None], **pdm_kwargs)
        for k, src in _PDM_KEYS.items():
            out[k].append(np.asarray(res[src])[: len(idx), 0])
    per = {k: np.concatenate(v) for k, v in out.items()}
    err = np.linalg.norm(trajectories[..., :2] - split.scenes.expert[..., :2], axis=-1)  # [N, 8]
    per["ade"], per["fde"] = err.mean(-1), err[:, -1]
    return per


def summarize(per_scene: dict[str, np.ndarray]) -> dict[str, float]:
    out = {k: float(np.nanmean(per_scene[k])) for k in REPORT_KEYS if k in per_scene}
    out["num_scenes"] = int(len(per_scene["pdms"]))
    return out


# `config.eval.protocol`: how a diffusion planner draws the one plan per scene it is scored on (name -> eta 0?).
#   upstream       what upstream's agent evaluates with, `get_action(deterministic=False)`: DDIM eta 1, step std
#                  floor 1e-4, step noise clipped to +-1 (spec/planner.md §3); the noise is drawn from config.seed,
#                  so a rerun reproduces the numbers.
#   deterministic  DDIM eta 0 and no step noise, from the same seeded initial noise.
# A comma list ('upstream,deterministic') makes the eval stage score each (same initial noise); the first is the
# headline (metrics.json's top-level keys, plots, per_scene.jsonl) and the one the il/rl stages evaluate with.
PROTOCOLS = {"upstream": False, "deterministic": True}


def eval_protocols(eval_config) -> tuple[str, ...]:
    """`config.eval.protocol` -> the protocol names, validated (an error names the key and the allowed values)."""
    raw = eval_config.protocol
    names = tuple(p.strip() for p in str(raw).split(",") if p.strip())
    if not names or any(p not in PROTOCOLS for p in names) or len(set(names)) != len(names):
        raise ConfigError(f"config.eval.protocol={raw!r}: expected one of {sorted(PROTOCOLS)} or a comma list of "
                          "them, e.g. 'upstream,deterministic' (the first is the headline)")
    return names


def make_sampler(module_def, protocol: str = "deterministic") -> Callable:
    """jit(params, cond, rng) → trajectories [B, 8, 3] under an evaluation `protocol` (see PROTOCOLS); built once
    per module definition."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"make_sampler: unknown protocol {protocol!r}; allowed: {sorted(PROTOCOLS)}")
    deterministic = PROTOCOLS[protocol]

    @jax.jit
    def sample(params, cond, rng):
        return module_def.bind(params).sample(cond, rng, deterministic=deterministic)
    return sample


def plan_split(sampler, params, split, rng, batch_size: int = 64) -> np.ndarray:
    """Plans for every scene of `split`, in fixed-size batches."""
    n = len(split)
    batch_size = min(batch_size, n)
    outs = []
    from recogdrive_jax.train.metrics import track
    for start in track(range(0, n, batch_size), desc=f"plan {n} scenes", unit="batches"):
        idx = np.arange(start, min(start + batch_size, n))
        pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
        traj = sampler(params, jax.tree.map(jnp.asarray, split.cond(pad)), jax.random.fold_in(rng, start))
        outs.append(np.asarray(traj)[: len(idx)])
    return np.concatenate(outs)


def constant_velocity_plans(split) -> np.ndarray:
    from recogdrive_jax.sim.baselines import constant_velocity_plan
    return constant_velocity_plan(split.scenes.status, split.scenes.history)


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """rows: {name: summary}. One line per planner."""
    keys = [k for k in REPORT_KEYS if any(k in r for r in rows.values())]
    lines = ["| planner | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, r in rows.items():
        cells = [f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, summary: dict[str, float], table_rows: dict[str, dict[str, float]]):
    if jax.process_index() != 0:
        return
    storage.write_text(storage.join(out_dir, "metrics.json"), json.dumps(summary, indent=2))
    storage.write_text(storage.join(out_dir, "metrics.md"), markdown_table(table_rows))


def plot_scenes(out_dir: str, split, idx, plans: dict[str, np.ndarray], per_scene: dict[str, np.ndarray] | None,
                prefix: str = "scene"):
    """BEV PNGs of scenes `idx` with each named plan (and the expert)."""
    if jax.process_index() != 0:
        return []
    from recogdrive_jax.sim import render
    storage.makedirs(out_dir)
    paths = []
    for i in idx:
        i = int(i)
        scene = split.scene_batch(np.array([i]))
        scene = type(scene)(**{k: np.asarray(v)[0] for k, v in vars(scene).items()})
        path = storage.join(out_dir, f"{prefix}_{i:05d}"
                            + (f"_pdms{per_scene['pdms'][i]:.2f}" if per_scene is not None else "") + ".png")
        with storage.staged_file(path) as local:  # PIL writes local files; a gs:// PNG is uploaded
            render.render_bev(scene, {name: p[i] for name, p in plans.items()}, path=local)
        paths.append(path)
    return paths
