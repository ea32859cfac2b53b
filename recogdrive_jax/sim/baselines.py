"""Rule-based baseline planners shared by sanity checks and eval stages."""
from __future__ import annotations

import numpy as np

from recogdrive_jax.sim import world


def constant_velocity_plan(status: np.ndarray, history: np.ndarray | None = None,
                           num_poses: int = world.NUM_PLAN_POSES, interval: float = world.PLAN_DT) -> np.ndarray:
    """Keeps the current velocity vector and heading: [..., 8] status (command 4, velocity 2, accel 2) ->
    [..., num_poses, 3] ego-frame poses at `interval` s. `history` ([..., 4, 3]) is accepted for signature
    compatibility with learned planners and unused (the status velocity is the ego's current velocity)."""
    status = np.asarray(status, np.float32)
    t = (np.arange(1, num_poses + 1, dtype=np.float32) * interval)
    vx, vy = status[..., 4:5], status[..., 5:6]
    x = vx * t
    y = vy * t
    h = np.zeros_like(x) + np.arctan2(vy, np.maximum(vx, 1e-6)) * (np.hypot(vx, vy) > 1e-3)
    return np.stack([x, y, h], -1).astype(np.float32)
