"""Optimizer factory: AdamW + warmup/cosine + global-norm clip + freeze masks, all from `config.optim`.

Gradient accumulation is not an optax wrapper here: the train step scans over micro-batches
(`train/step.py`), so the optimizer state has the same structure with or without accumulation and a
checkpoint moves freely between `grad_accum` settings.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import optax

from recogdrive_jax import config_types


def _typed(optim_cfg) -> config_types.OptimConfig:
    """`config.optim` as the typed block (a mapping is typed here: unknown keys and wrong types raise)."""
    return config_types.from_mapping(config_types.OptimConfig, optim_cfg, "optim")


def make_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_ratio` (or `warmup_steps`) of the run, then cosine to `lr * min_lr_ratio`.

    `cosine_steps` (0 = the run length) sets the cosine period (PPO's T_max=20 over 15 updates) and
    `optimizer_steps_per_step` > 1 holds the LR for that many optimizer updates, for updates that take several
    optimizer steps per loop step (PPO epochs × minibatches) but step the schedule once per loop step.
    """
    optim_cfg = _typed(optim_cfg)
    per = optim_cfg.optimizer_steps_per_step
    base = _step_schedule(optim_cfg, num_steps)
    return base if per == 1 else (lambda count: base(count // per))


def _step_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
    lr = optim_cfg.lr
    warmup = optim_cfg.warmup_steps or round(optim_cfg.warmup_ratio * num_steps)
    kind = optim_cfg.schedule
    end = lr * optim_cfg.min_lr_ratio
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
                                    [warmup]) if warmup else optax.constant_schedule(lr)
    if kind != "cosine":
        raise ValueError(f"config.optim.schedule: unknown {kind!r}; allowed: ['cosine', 'constant']")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(optim_cfg.cosine_steps or num_steps, warmup + 1), end_value=end)


def path_str(path) -> str:
    """'a/b/0/kernel' for a jax key path: what freeze regexes match against."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def freeze_labels(params, freeze_patterns: Sequence[str]):
    """'frozen' for every parameter whose path matches one of `freeze_patterns` (re.search), else 'train'."""
    regexes = [re.compile(p) for p in freeze_patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if any(r.search(path_str(path)) for r in regexes) else "train", params)


def make_optimizer(optim_cfg, num_steps: int, params=None) -> optax.GradientTransformation:
    """AdamW with clip and schedule; parameters matching `optim_cfg.freeze` get no update and no moments."""
    optim_cfg = _typed(optim_cfg)
    schedule = make_schedule(optim_cfg, num_steps)
    parts = []
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    parts.append(optax.adamw(learning_rate=schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay))
    tx = optax.chain(*parts)
    freeze = optim_cfg.freeze
    if freeze:
        if params is None:
            raise ValueError("make_optimizer: freeze patterns need the parameter tree")
        labels = freeze_labels(params, freeze)
        if not any(l == "train" for l in jax.tree.leaves(labels)):
            raise ValueError(f"config.optim.freeze={list(freeze)} freezes every parameter")
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx
