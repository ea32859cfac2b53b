"""A small *fixed* (untrained) encoder from synthetic scenes to token sequences shaped like VLM hidden states.

This is the documented stand-in for the VLM hidden-state cache: until a `cache` stage has run a VLM over the
scenes, the planner stages (`il`, `rl`, `eval`) read `[B, L, Hv]` tokens made here from what a camera-and-map
VLM would see — the route ahead, the other road users, the command — so the planner's cross-attention has
real information to use. Each token is a fixed random Fourier embedding of a few scene features plus a fixed
type vector; nothing here is learned, and the result depends only on the scene and `seed`.

Tokens (ego frame): `NUM_ROUTE` route-centreline points (x, y, cos h, sin h) every `ROUTE_STEP` metres, one
per object (x, y, cos h, sin h, length, width, vx, vy, and its position 2 s ahead), one command token.
"""
from __future__ import annotations

import numpy as np

from recogdrive_jax.sim import world

NUM_ROUTE = 16
ROUTE_STEP = 4  # metres between route tokens (the centreline has 1 m spacing)
FEATURES = 12  # per-token feature width before the Fourier embedding
# Feature scales: positions ~ tens of metres, angles/sizes ~ 1.
_SCALE = np.array([1 / 30, 1 / 30, 1, 1, 1 / 5, 1 / 2, 1 / 10, 1 / 10, 1 / 30, 1 / 30, 1, 1], np.float32)


def num_tokens() -> int:
    return NUM_ROUTE + world.MAX_OBJECTS + 1


def _route_features(scene) -> tuple[np.ndarray, np.ndarray]:
    cl, cm = np.asarray(scene.centerline), np.asarray(scene.centerline_mask)  # [B, C, 3], [B, C]
    idx = np.arange(NUM_ROUTE) * ROUTE_STEP
    pts, mask = cl[:, idx], cm[:, idx]  # [B, R, 3]
    f = np.zeros(pts.shape[:2] + (FEATURES,), np.float32)
    f[..., 0], f[..., 1] = pts[..., 0], pts[..., 1]
    f[..., 2], f[..., 3] = np.cos(pts[..., 2]), np.sin(pts[..., 2])
    return f, mask


def _object_features(scene) -> tuple[np.ndarray, np.ndarray]:
    boxes, valid = np.asarray(scene.obj_boxes), np.asarray(scene.obj_valid)  # [B, F, A, 5], [B, F, A]
    speed = np.asarray(scene.obj_speed)  # [B, A]
    now, later = boxes[:, 0], boxes[:, min(20, boxes.shape[1] - 1)]  # t = 0 and t = 2 s
    h = now[..., 2]
    f = np.zeros(now.shape[:2] + (FEATURES,), np.float32)
    f[..., 0], f[..., 1] = now[..., 0], now[..., 1]
    f[..., 2], f[..., 3] = np.cos(h), np.sin(h)
    f[..., 4], f[..., 5] = now[..., 3], now[..., 4]
    f[..., 6], f[..., 7] = speed * np.cos(h), speed * np.sin(h)
    moving = valid[:, min(20, boxes.shape[1] - 1)]
    f[..., 8] = np.where(moving, later[..., 0], now[..., 0])
    f[..., 9] = np.where(moving, later[..., 1], now[..., 1])
    return f, valid[:, 0] & (np.asarray(scene.obj_type) > 0)


def _command_features(scene) -> tuple[np.ndarray, np.ndarray]:
    status = np.asarray(scene.status)  # [B, 8]
    f = np.zeros((status.shape[0], 1, FEATURES), np.float32)
    f[:, 0, :4] = status[:, :4]
    f[:, 0, 10:12] = status[:, 4:6] / 10.0
    return f, np.ones((status.shape[0], 1), bool)


def scene_tokens(scene, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Batched `Scene` → (tokens [B, L, dim] float32, mask [B, L] bool), L = `num_tokens()`.

    Masked-out tokens (missing objects, route beyond its end) are zero, as padding would be in a VLM cache.
    """
    if dim % 2:
        raise ValueError(f"scene_tokens: dim must be even, got {dim}")
    rng = np.random.default_rng([seed, dim])
    proj = rng.normal(size=(FEATURES, dim // 2)).astype(np.float32) * 2.0  # Fourier frequencies
    type_vec = rng.normal(size=(3, dim)).astype(np.float32) / np.sqrt(dim)
    parts = [_route_features(scene), _object_features(scene), _command_features(scene)]
    tokens, masks = [], []
    for t, (f, m) in enumerate(parts):
        z = (f * _SCALE) @ proj  # [B, n, dim/2]
        emb = np.concatenate([np.sin(z), np.cos(z)], -1) / np.sqrt(dim / 2) + type_vec[t]
        tokens.append(np.where(m[..., None], emb, 0.0).astype(np.float32))
        masks.append(m)
    return np.concatenate(tokens, 1), np.concatenate(masks, 1)
