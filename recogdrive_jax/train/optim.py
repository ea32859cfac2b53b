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


def make_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_ratio` (or `warmup_steps`) of the run, then cosine to `lr * min_lr_ratio`.

    `cosine_steps` (0 = the run length) sets the cosine period (PPO's T_max=20 over 15 updates) and
    `optimizer_steps_per_step` > 1 holds the LR for that many optimizer updates, for updates that take several
    optimizer steps per loop step (PPO epochs × minibatches) but step the schedule once per loop step.
    """
    per = int(optim_cfg.get("optimizer_steps_per_step", 1) or 1)
    base = _step_schedule(optim_cfg, num_steps)
    return base if per == 1 else (lambda count: base(count // per))


def _step_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
    lr = float(optim_cfg.lr)
    warmup = int(optim_cfg.get("warmup_steps", 0) or round(float(optim_cfg.get("warmup_ratio", 0.0)) * num_steps))
    kind = optim_cfg.get("schedule", "cosine")
    end = lr * float(optim_cfg.get("min_lr_ratio", 0.0))
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
                                    [warmup]) if warmup else optax.constant_schedule(lr)
    if kind != "cosine":
        raise ValueError(f"config.optim.schedule: unknown {kind!r}; allowed: ['cosine', 'constant']")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(int(optim_cfg.get("cosine_steps", 0) or num_steps), warmup + 1), end_value=end)


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
    schedule = make_schedule(optim_cfg, num_steps)
    parts = []
    if float(optim_cfg.get("clip_norm", 0.0) or 0.0) > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
    parts.append(optax.adamw(
        learning_rate=schedule, b1=float(optim_cfg.get("b1", 0.9)), b2=float(optim_cfg.get("b2", 0.999)),
        eps=float(optim_cfg.get("eps", 1e-8)), weight_decay=float(optim_cfg.get("weight_decay", 0.0))))
    tx = optax.chain(*parts)
    freeze = tuple(optim_cfg.get("freeze", ()) or ())
    if freeze:
        if params is None:
            raise ValueError("make_optimizer: freeze patterns need the parameter tree")
        labels = freeze_labels(params, freeze)
        if not any(l == "train" for l in jax.tree.leaves(labels)):
            raise ValueError(f"config.optim.freeze={list(freeze)} freezes every parameter")
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx
