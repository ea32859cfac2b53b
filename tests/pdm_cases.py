"""Random candidate trajectories for PDM tests and the benchmark: expert-like, noisy, colliding, off-road,
reversing, stationary, jerky and random-arc plans (deterministic per seed)."""
from __future__ import annotations

import numpy as np

from recogdrive_jax.sim import world

FAMILIES = ("expert", "noisy", "const_vel", "stationary", "reverse", "jerky", "offroad", "collide", "arc", "fast")


def _poses_from_xy(xy: np.ndarray) -> np.ndarray:
    d = np.diff(np.concatenate([np.zeros((1, 2)), xy], 0), axis=0)
    h = np.arctan2(d[:, 1], d[:, 0])
    h = np.where(np.hypot(d[:, 0], d[:, 1]) < 1e-3, 0.0, h)
    return np.concatenate([xy, h[:, None]], -1)


def make_trajectory(scene: world.Scene, family: str, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(1, 9) * 0.5
    v0 = float(scene.status[4])
    if family == "expert":
        return np.asarray(scene.expert, np.float64)
    if family == "noisy":
        e = np.asarray(scene.expert, np.float64).copy()
        e[:, :2] += rng.normal(0, 0.4, (8, 2)) * t[:, None] / 2
        e[:, 2] += rng.normal(0, 0.05, 8)
        return e
    if family == "const_vel":
        return _poses_from_xy(np.stack([v0 * t, np.zeros(8)], -1))
    if family == "stationary":
        return np.zeros((8, 3))
    if family == "reverse":
        v = rng.uniform(0.5, 4.0)
        xy = np.stack([-v * t, rng.normal(0, 0.2) * t], -1)
        out = np.concatenate([xy, np.zeros((8, 1))], -1)
        return out
    if family == "jerky":
        v = v0 + rng.uniform(-2, 4)
        steps = np.maximum(v + rng.choice([-1, 1], 8) * rng.uniform(2, 6, 8), 0.2) * 0.5
        xy = np.stack([np.cumsum(steps), np.cumsum(rng.normal(0, 0.6, 8))], -1)
        return _poses_from_xy(xy)
    if family == "offroad":
        side = rng.choice([-1, 1])
        y = side * rng.uniform(5, 20) * (t / 4) ** 2
        return _poses_from_xy(np.stack([max(v0, 3) * t, y], -1))
    if family == "collide":
        valid = np.nonzero(scene.obj_type > 0)[0]
        if len(valid) == 0:
            return make_trajectory(scene, "fast", rng)
        a = int(rng.choice(valid))
        f = int(rng.integers(10, 41))
        target = np.asarray(scene.obj_boxes[f, a, :2], np.float64)
        frac = np.clip(t / (f * 0.1), 0, 1)
        return _poses_from_xy(target[None] * frac[:, None])
    if family == "arc":
        v = rng.uniform(0, 15)
        k = rng.uniform(-0.08, 0.08)
        s = v * t
        h = k * s
        x = np.where(abs(k) > 1e-6, np.sin(h) / np.where(abs(k) > 1e-6, k, 1), s)
        y = np.where(abs(k) > 1e-6, (1 - np.cos(h)) / np.where(abs(k) > 1e-6, k, 1), 0)
        return np.stack([x, y, h], -1)
    if family == "fast":
        a = rng.uniform(1, 4)
        s = v0 * t + 0.5 * a * t ** 2
        return _poses_from_xy(np.stack([s, np.zeros(8)], -1))
    raise ValueError(family)


def make_cases(num_scenes: int, per_scene: int, seed: int = 0):
    """(batched Scene, trajectories [B, G, 8, 3], family names [B][G])."""
    rng = np.random.default_rng(seed)
    scenes = [world.generate_scene(seed * 7919 + i, reference="expert") for i in range(num_scenes)]  # scorer cases
    trajs, fams = [], []
    for sc in scenes:
        fam = [FAMILIES[(j + rng.integers(0, len(FAMILIES))) % len(FAMILIES)] if j >= len(FAMILIES) else FAMILIES[j]
               for j in range(per_scene)]
        trajs.append(np.stack([make_trajectory(sc, f, rng) for f in fam]))
        fams.append(fam)
    return scenes, np.stack(trajs).astype(np.float32), fams
