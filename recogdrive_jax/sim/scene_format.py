"""The scene format, numpy only: sizes, the `Scene` arrays, path geometry helpers and the scene-file writer.

One source of truth for what a scene holds, importable without jax: `convert/navsim_metric_cache.py` runs inside a
user's NAVSIM environment (old numpy, no jax, no other dependency of this package) and builds scenes from these
definitions; `sim/world.py` re-exports them (and registers `Scene` as a jax pytree); `sim/scene_store.py` reads
the files `save_scene_arrays` writes.

Conventions: ego frame (the ego's rear axle at t = 0 is the origin, +x forward, +y left), metres, radians,
seconds; every array has a fixed padded size with a mask (module docstring of `sim/world.py`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Sizes and constants.
DT = 0.1  # s, simulation / agent frame interval
PLAN_DT = 0.5  # s, planner output interval
NUM_PLAN_POSES = 8  # 4 s
NUM_HISTORY = 4  # poses at -1.5, -1.0, -0.5, 0.0 s
NUM_SIM_STATES = 41  # 0..4 s at 0.1 s
NUM_FRAMES = 51  # agent frames 0..5 s (TTC looks 0.9 s past the 4 s horizon)
NUM_HIST10 = 14  # 10 Hz ego history states at -1.5..-0.2 s (EPDMS history comfort)
MAX_OBJECTS = 24
MAX_DRIVABLE = 8
MAX_LANES = 24
MAX_INTERSECTIONS = 2
POLY_VERTS = 64
CENTERLINE_LEN = 256  # route centreline points (1 m spacing in the synthetic world)
LANE_WIDTH = 3.5

COMMANDS = ("left", "straight", "right", "unknown")  # index order of the 4-dim one-hot
SCENE_KINDS = ("straight", "curve", "junction")
DOMAINS = ("day", "night", "fog")
# Object types: 0 = padding.
OBJ_VEHICLE, OBJ_PARKED, OBJ_CONE, OBJ_BARRIER = 1, 2, 3, 4
OBJ_TYPE_NAMES = {OBJ_VEHICLE: "car", OBJ_PARKED: "parked car", OBJ_CONE: "traffic cone", OBJ_BARRIER: "barrier"}

# Ego vehicle (nuPlan Pacifica, spec/pdm.md §2).
EGO_WIDTH = 2.297
EGO_FRONT = 4.049  # rear axle -> front bumper
EGO_REAR = 1.127  # rear axle -> rear bumper
EGO_LENGTH = EGO_FRONT + EGO_REAR
EGO_REAR_AXLE_TO_CENTER = 1.461
WHEELBASE = 3.089

FORMAT_VERSION = 1  # of scene files (`save_scene_arrays` / `scene_store.load_scenes`)


@dataclasses.dataclass
class Scene:
    """One scene (or a batch of scenes with a leading axis `B` on every field) as fixed-size numpy arrays.

    Ego frame, metres / radians / seconds (module docstring). `A = MAX_OBJECTS`, `F = NUM_FRAMES`,
    `V = POLY_VERTS`.
    """

    history: np.ndarray  # [4, 3] f32 past ego rear-axle poses (x, y, heading) at -1.5, -1.0, -0.5, 0 s
    status: np.ndarray  # [8] f32 command one-hot (4) ++ velocity (vx, vy) ++ acceleration (ax, ay), body frame
    expert: np.ndarray  # [8, 3] f32 expert future poses at 0.5..4.0 s
    ref_poses: np.ndarray  # [41, 3] f32 EP's reference at 0..4 s, 0.1 s: PDM-Closed (default) or the expert
    hist10: np.ndarray  # [14, 5] f32 (heading, ax, ay, yaw rate, yaw accel) at -1.5..-0.2 s (EPDMS HC)
    obj_boxes: np.ndarray  # [F, A, 5] f32 (x, y, heading, length, width) of box centres per frame
    obj_valid: np.ndarray  # [F, A] bool, object present in frame
    obj_type: np.ndarray  # [A] i32 OBJ_* (0 = padding)
    obj_speed: np.ndarray  # [A] f32 speed at first appearance (m/s)
    drivable: np.ndarray  # [MAX_DRIVABLE, V, 2] f32 drivable-area polygons (road blocks, intersections)
    drivable_mask: np.ndarray  # [MAX_DRIVABLE] bool
    lanes: np.ndarray  # [MAX_LANES, V, 2] f32 lane / lane-connector polygons
    lane_mask: np.ndarray  # [MAX_LANES] bool
    lane_on_route: np.ndarray  # [MAX_LANES] bool, lane belongs to a route road block (same direction as route)
    intersections: np.ndarray  # [MAX_INTERSECTIONS, V, 2] f32 intersection polygons
    intersection_mask: np.ndarray  # [MAX_INTERSECTIONS] bool
    centerline: np.ndarray  # [CENTERLINE_LEN, 3] f32 route centreline (x, y, heading), padded with its last point
    centerline_mask: np.ndarray  # [CENTERLINE_LEN] bool
    command: np.ndarray  # [] i32 index into COMMANDS
    kind: np.ndarray  # [] i32 index into SCENE_KINDS
    domain: np.ndarray  # [] i32 index into DOMAINS (visual palette only)
    seed: np.ndarray  # [] i64 generation seed

    def num_objects(self) -> int:
        return int((self.obj_type > 0).sum())


# Shapes/dtypes of one (unbatched) scene, used by stacking and the scene store's validation.
SCENE_SCHEMA: "dict[str, tuple[tuple[int, ...], np.dtype]]" = {
    "history": ((NUM_HISTORY, 3), np.dtype(np.float32)),
    "status": ((8,), np.dtype(np.float32)),
    "expert": ((NUM_PLAN_POSES, 3), np.dtype(np.float32)),
    "ref_poses": ((NUM_SIM_STATES, 3), np.dtype(np.float32)),
    "hist10": ((NUM_HIST10, 5), np.dtype(np.float32)),
    "obj_boxes": ((NUM_FRAMES, MAX_OBJECTS, 5), np.dtype(np.float32)),
    "obj_valid": ((NUM_FRAMES, MAX_OBJECTS), np.dtype(bool)),
    "obj_type": ((MAX_OBJECTS,), np.dtype(np.int32)),
    "obj_speed": ((MAX_OBJECTS,), np.dtype(np.float32)),
    "drivable": ((MAX_DRIVABLE, POLY_VERTS, 2), np.dtype(np.float32)),
    "drivable_mask": ((MAX_DRIVABLE,), np.dtype(bool)),
    "lanes": ((MAX_LANES, POLY_VERTS, 2), np.dtype(np.float32)),
    "lane_mask": ((MAX_LANES,), np.dtype(bool)),
    "lane_on_route": ((MAX_LANES,), np.dtype(bool)),
    "intersections": ((MAX_INTERSECTIONS, POLY_VERTS, 2), np.dtype(np.float32)),
    "intersection_mask": ((MAX_INTERSECTIONS,), np.dtype(bool)),
    "centerline": ((CENTERLINE_LEN, 3), np.dtype(np.float32)),
    "centerline_mask": ((CENTERLINE_LEN,), np.dtype(bool)),
    "command": ((), np.dtype(np.int32)),
    "kind": ((), np.dtype(np.int32)),
    "domain": ((), np.dtype(np.int32)),
    "seed": ((), np.dtype(np.int64)),
}


def stack_scenes(scenes: Sequence[Scene]) -> Scene:
    """Stacks scenes into one batched `Scene` (leading axis B) — the input `pdm_score` takes."""
    return Scene(**{k: np.stack([getattr(s, k) for s in scenes]) for k in SCENE_SCHEMA})


def index_scene(batch: Scene, i: int) -> Scene:
    """The i-th scene of a batched `Scene`."""
    return Scene(**{k: np.asarray(getattr(batch, k))[i] for k in SCENE_SCHEMA})


def cast_scene(scene: Scene) -> Scene:
    """Every field as the schema's dtype."""
    return Scene(**{k: np.asarray(getattr(scene, k)).astype(SCENE_SCHEMA[k][1]) for k in SCENE_SCHEMA})


def save_scene_arrays(path: str, scenes: "Scene | Sequence[Scene]", extra: "Mapping[str, np.ndarray] | None" = None
                      ) -> str:
    """Writes one scene or a list/batch of scenes to `path` (.npz, compressed, plain arrays only) in the layout
    `scene_store.load_scenes` reads; `extra`: more plain arrays stored beside the scene fields (e.g. NAVSIM
    `tokens` [N] str). Written to a temporary name first, so a crash never leaves a half file. Returns the path."""
    batch = scenes if isinstance(scenes, Scene) else stack_scenes(list(scenes))
    arrays = {k: np.asarray(getattr(batch, k)) for k in SCENE_SCHEMA}
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, __format_version__=np.array(FORMAT_VERSION), **dict(extra or {}), **arrays)
    os.replace(tmp, path)
    return path


def wrap_angle(a):
    return (a + np.pi) % (2 * np.pi) - np.pi


# ---------------------------------------------------------------------------------------------------------------
# Path and polygon helpers. A path is an [N, 3] array of (x, y, heading) samples.


def arclength(path: np.ndarray) -> np.ndarray:
    """Cumulative arc length [N] of a path's (x, y) polyline."""
    return np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(path[:, 0]), np.diff(path[:, 1])))])


def interp_path(path: np.ndarray, s: np.ndarray, cum: "np.ndarray | None" = None) -> np.ndarray:
    """Poses at arc lengths `s` (linear extrapolation past either end)."""
    cum = arclength(path) if cum is None else cum
    s = np.asarray(s, np.float64)
    h = np.unwrap(path[:, 2])
    x = np.interp(s, cum, path[:, 0])
    y = np.interp(s, cum, path[:, 1])
    hh = np.interp(s, cum, h)
    for end, sgn in ((0, -1), (-1, 1)):
        sel = (s < cum[0]) if sgn < 0 else (s > cum[-1])
        if np.any(sel):
            ds = s[sel] - cum[end]
            x[sel] = path[end, 0] + ds * np.cos(path[end, 2])
            y[sel] = path[end, 1] + ds * np.sin(path[end, 2])
            hh[sel] = h[end]
    return np.stack([x, y, wrap_angle(hh)], -1)


def project_to_path(path: np.ndarray, cum: np.ndarray, pts: np.ndarray):
    """(arc length [N], signed lateral offset [N], + left) of points [N, 2] on the nearest segment of a path."""
    a = path[:-1, None, :2]
    b = path[1:, None, :2]
    ab = b - a
    ap = pts[None] - a
    L2 = np.maximum((ab ** 2).sum(-1), 1e-12)
    t = np.clip((ap * ab).sum(-1) / L2, 0, 1)
    closest = a + t[..., None] * ab
    d = np.hypot(*(pts[None] - closest).transpose(2, 0, 1))
    i = d.argmin(0)
    j = np.arange(len(pts))
    seg_len = np.sqrt(L2[i, 0])
    s = cum[i] + t[i, j] * seg_len
    cross = ab[i, 0, 0] * ap[i, j, 1] - ab[i, 0, 1] * ap[i, j, 0]
    return s, np.sign(cross) * d[i, j]


def pad_poly(poly: np.ndarray) -> np.ndarray:
    """[K <= POLY_VERTS, 2] polygon -> [POLY_VERTS, 2], padded by repeating vertex 0 (degenerate edges)."""
    if len(poly) > POLY_VERTS:
        raise ValueError(f"polygon has {len(poly)} vertices, at most {POLY_VERTS} fit a scene")
    out = np.repeat(poly[:1], POLY_VERTS, 0)
    out[: len(poly)] = poly
    return out
