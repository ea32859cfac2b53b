"""Pieces the planner stages (`il`, `rl`, `eval`) share: config → PlannerConfig with key-naming errors, plots."""
from __future__ import annotations

import numpy as np

from recogdrive_jax.configs import ConfigError
from recogdrive_jax.eval import planner_eval
from recogdrive_jax.models.planner import PlannerConfig


def planner_config(config) -> PlannerConfig:
    try:
        return PlannerConfig.from_mapping(config.planner)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e) if str(e).startswith("config.") else f"config.planner: {e}") from None


def plot_examples(out_dir, split, plans, per_scene, num: int):
    """The best and worst scenes by PDMS (then the first few), predicted vs expert."""
    if num <= 0:
        return []
    order = np.argsort(per_scene["pdms"], kind="stable")
    worst, best = order[: (num + 1) // 2], order[::-1][: num // 2]
    return planner_eval.plot_scenes(out_dir, split, np.concatenate([best, worst]), {"planner": plans}, per_scene)
