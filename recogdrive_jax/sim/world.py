"""Seeded procedural driving scenes: the synthetic stand-in for NAVSIM scenes and their metric cache.

Conventions (everything a `Scene` holds uses them):
- **Ego frame**: the ego's rear axle at t = 0 is the origin, +x points forward along its heading, +y to the left
  (right-handed, right-hand traffic). Headings are radians, counter-clockwise from +x, wrapped to (-pi, pi].
- Units: metres, seconds, m/s, m/s^2. Times are 0.1 s frames (`DT`) for simulation/agents and 0.5 s for
  the planner's 8-pose output (`PLAN_DT`).
- Every array has a fixed padded size with a mask, so scenes stack into a batch pytree (`stack_scenes`) and the
  vectorised PDM scorer (`sim/pdm.py`) jits once per batch shape. Padded polygon vertices repeat the polygon's
  first vertex (degenerate edges), so point-in-polygon needs no vertex mask; padded centreline points repeat
  the last real point.

A scene is a straight road, a constant-curvature curve (with clothoid transitions) or a junction with
left / straight / right exits; roads have 1-3 lanes per direction. Other vehicles follow their lanes
(51 frames = 5 s at 10 Hz, enough for the TTC look-ahead), static obstacles (cones, barriers, parked cars) sit on
the road, and a rule-based planner (IDM along the route with curvature speed limits) produces the expert future.
EP's reference (`ref_poses`) is NAVSIM's PDM-Closed run on the scene at its speed limit (`sim/pdm_closed.py`,
checked against the real planner), or the expert's own poses with `reference="expert"`.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Sequence

import jax
import numpy as np

# Sizes, constants, `Scene` and the path helpers live in the numpy-only `scene_format` (one source of truth that the
# NAVSIM metric-cache converter imports without jax); they are re-exported here under their usual names.
from recogdrive_jax.sim.scene_format import (  # noqa: F401
    CENTERLINE_LEN, COMMANDS, DOMAINS, DT, EGO_FRONT, EGO_LENGTH, EGO_REAR, EGO_REAR_AXLE_TO_CENTER, EGO_WIDTH,
    LANE_WIDTH, MAX_DRIVABLE, MAX_INTERSECTIONS, MAX_LANES, MAX_OBJECTS, NUM_FRAMES, NUM_HIST10, NUM_HISTORY,
    NUM_PLAN_POSES, NUM_SIM_STATES, OBJ_BARRIER, OBJ_CONE, OBJ_PARKED, OBJ_TYPE_NAMES, OBJ_VEHICLE, PLAN_DT,
    POLY_VERTS, SCENE_KINDS, SCENE_SCHEMA, WHEELBASE, Scene, index_scene, stack_scenes, wrap_angle)
from recogdrive_jax.sim.scene_format import arclength as _arclength  # noqa: F401
from recogdrive_jax.sim.scene_format import cast_scene as _cast  # noqa: F401
from recogdrive_jax.sim.scene_format import interp_path as _interp_path  # noqa: F401
from recogdrive_jax.sim.scene_format import pad_poly as _pad_poly  # noqa: F401
from recogdrive_jax.sim.scene_format import project_to_path

jax.tree_util.register_dataclass(Scene, data_fields=[f.name for f in dataclasses.fields(Scene)], meta_fields=[])


# ---------------------------------------------------------------------------------------------------------------
# Path geometry. A path is an [N, 3] array of (x, y, heading) samples at uniform arc-length spacing.


def _integrate(x0: float, y0: float, h0: float, kappa: np.ndarray, ds: float) -> np.ndarray:
    """Integrates a curvature profile (one value per step) from a start pose; returns len(kappa)+1 poses."""
    h = h0 + np.concatenate([[0.0], np.cumsum(kappa * ds)])
    hm = 0.5 * (h[1:] + h[:-1])  # midpoint rule
    x = x0 + np.concatenate([[0.0], np.cumsum(np.cos(hm) * ds)])
    y = y0 + np.concatenate([[0.0], np.cumsum(np.sin(hm) * ds)])
    return np.stack([x, y, h], -1)


def _line(x0, y0, h0, length, ds=0.5) -> np.ndarray:
    n = max(int(round(length / ds)), 1)
    return _integrate(x0, y0, h0, np.zeros(n), length / n)


def _offset(path: np.ndarray, d: float) -> np.ndarray:
    """Path offset by `d` metres to its left."""
    return np.stack([path[:, 0] - d * np.sin(path[:, 2]), path[:, 1] + d * np.cos(path[:, 2]), path[:, 2]], -1)


def _reverse(path: np.ndarray) -> np.ndarray:
    out = path[::-1].copy()
    out[:, 2] = wrap_angle(out[:, 2] + np.pi)
    return out


def _resample(path: np.ndarray, n: int) -> np.ndarray:
    cum = _arclength(path)
    return _interp_path(path, np.linspace(0.0, cum[-1], n), cum)


def _strip_polygon(path: np.ndarray, d_left: float, d_right: float, n: int = POLY_VERTS // 2) -> np.ndarray:
    """Polygon between offsets `d_left` and `-d_right` of a path: n points each side -> [2n, 2]."""
    p = _resample(path, n)
    left = _offset(p, d_left)[:, :2]
    right = _offset(p, -d_right)[:, :2]
    return np.concatenate([left, right[::-1]], 0)


def _rect(x0, x1, y0, y1) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def _turn_unit(sign: float, n: int = 400) -> tuple[np.ndarray, float]:
    """A symmetric 90-degree turn of unit length (trapezoid curvature: ramp 1/3, hold 1/3, ramp 1/3).

    Its x and y displacements are equal by symmetry, so scaling it connects any two perpendicular lanes whose
    entry/exit offsets match (as in `_junction_roads`) with a curvature-continuous path."""
    s = (np.arange(n) + 0.5) / n
    shape = np.clip(np.minimum(s, 1.0 - s) * 3.0, 0.0, 1.0)
    kmax = (np.pi / 2) / (shape.sum() / n)
    path = _integrate(0.0, 0.0, 0.0, sign * kmax * shape, 1.0 / n)
    return path, float(path[-1, 0])


# ---------------------------------------------------------------------------------------------------------------
# Road layouts. Each returns lanes (dicts with 'path' in driving direction, 'polygon', 'on_route',
# 'connector', 'role'), drivable polygons, intersection polygons, the route path and the command.


def _lane(path, on_route, role, connector=False):
    return dict(path=path, polygon=_strip_polygon(path, LANE_WIDTH / 2, LANE_WIDTH / 2), on_route=on_route,
                role=role, connector=connector)


def _road_lanes(divider: np.ndarray, n_fwd: int, n_back: int, fwd_on_route: bool, road: str):
    lanes = []
    for k in range(n_fwd):
        lanes.append(_lane(_offset(divider, -(k + 0.5) * LANE_WIDTH), fwd_on_route, (road, "fwd", k)))
    for k in range(n_back):
        lanes.append(_lane(_reverse(_offset(divider, (k + 0.5) * LANE_WIDTH)), False, (road, "back", k)))
    return lanes


def _open_road(rng: np.random.Generator, curved: bool):
    n_fwd = int(rng.integers(1, 4))
    n_back = int(rng.integers(0, 3))
    k_e = int(rng.integers(0, n_fwd))
    y_d = (k_e + 0.5) * LANE_WIDTH
    ds = 0.5
    n_back_len, n_fwd_len = 60.0, 170.0
    kappa = np.zeros(int((n_back_len + n_fwd_len) / ds))
    if curved:
        s_c = n_back_len + rng.uniform(3.0, 40.0)
        radius = rng.uniform(45.0, 200.0)
        k = rng.choice([-1.0, 1.0]) / radius
        s = np.arange(len(kappa)) * ds + ds / 2
        ramp = 20.0
        kappa = k * np.clip((s - s_c) / ramp, 0.0, 1.0)
    divider = _integrate(-n_back_len, y_d, 0.0, kappa, ds)
    lanes = _road_lanes(divider, n_fwd, n_back, True, "main")
    drivable = [_strip_polygon(divider, n_back * LANE_WIDTH + 0.3, n_fwd * LANE_WIDTH + 0.3)]
    route = lanes[k_e]["path"]
    return dict(lanes=lanes, drivable=drivable, intersections=[], route=route, ego_lane=k_e,
                n_fwd=n_fwd, n_back=n_back)


def _junction_roads(rng: np.random.Generator):
    n = int(rng.integers(1, 3))
    k_e = int(rng.integers(0, n))
    w = LANE_WIDTH
    half = n * w  # half road width
    m = 8.0  # intersection margin around the roads (gives turn radii >= ~10 m)
    y_d = (k_e + 0.5) * w
    x_j = float(rng.uniform(10.0, 45.0))
    x_c = x_j + m + half
    side = 2 * half + 2 * m
    out_len = 90.0
    dividers = {
        "in": _line(-60.0, y_d, 0.0, 60.0 + x_j),
        "straight": _line(x_j + side, y_d, 0.0, out_len),
        "left": _line(x_c, y_d + half + m, np.pi / 2, out_len),
        "right": _line(x_c, y_d - half - m, -np.pi / 2, out_len),
    }
    choice = str(rng.choice(["left", "straight", "right"]))
    lanes = _road_lanes(dividers["in"], n, n, True, "in")
    for name in ("straight", "left", "right"):
        lanes += _road_lanes(dividers[name], n, n, name == choice, name)
    # Connectors from each incoming lane to the same-index lane of each exit.
    route_conn = None
    for k in range(n):
        start = _offset(dividers["in"], -(k + 0.5) * w)[-1]
        for name in ("straight", "left", "right"):
            if name == "straight":
                path = _line(start[0], start[1], 0.0, side)
            else:
                sign = 1.0 if name == "left" else -1.0
                unit, dx_u = _turn_unit(sign)
                target = _offset(dividers[name], -(k + 0.5) * w)[0]
                scale = abs(target[0] - start[0]) / dx_u
                path = unit.copy()
                path[:, :2] = path[:, :2] * scale + start[:2]
                path = _resample(path, 80)
            lanes.append(_lane(path, name == choice, ("conn", name, k), connector=True))
            if k == k_e and name == choice:
                route_conn = path
    square = _rect(x_j, x_j + side, y_d - half - m, y_d + half + m)
    drivable = [_strip_polygon(dividers["in"], half + 0.3, half + 0.3, 8), square]
    for name in ("straight", "left", "right"):
        drivable.append(_strip_polygon(dividers[name], half + 0.3, half + 0.3, 8))
    exit_lane = _offset(dividers[choice], -(k_e + 0.5) * w)
    in_lane = _offset(dividers["in"], -(k_e + 0.5) * w)
    route = np.concatenate([in_lane[:-1], route_conn[:-1], exit_lane], 0)
    return dict(lanes=lanes, drivable=drivable, intersections=[square], route=route, ego_lane=k_e,
                n_fwd=n, n_back=n, choice=choice, x_j=x_j)


# ---------------------------------------------------------------------------------------------------------------
# Route helpers and the rule-based expert.


class _Route:
    def __init__(self, path: np.ndarray, s_origin_shift: bool = True):
        cum = _arclength(path)
        # Uniform 1 m resampling; arc length 0 at the ego's rear axle (the origin).
        s0 = self._project_xy(path, cum, np.zeros((1, 2)))[0][0] if s_origin_shift else 0.0
        s = np.arange(np.ceil(-s0), cum[-1] - s0 + 1e-9, 1.0)
        self.path = _interp_path(path, s + s0, cum)
        self.s = s
        h = np.unwrap(self.path[:, 2])
        self.kappa = np.gradient(h, s)

    _project_xy = staticmethod(project_to_path)

    def project(self, pts: np.ndarray):
        """(arc length, signed lateral offset) of points [N, 2]."""
        s, d = self._project_xy(self.path, self.s - self.s[0], pts)
        return s + self.s[0], d

    def pose(self, s):
        return _interp_path(self.path, np.asarray(s) - self.s[0], self.s - self.s[0])


def _allowed_speed(route: _Route, v_limit: float, a_lat: float = 2.0) -> np.ndarray:
    return np.minimum(v_limit, np.sqrt(a_lat / np.maximum(np.abs(route.kappa), 1e-6)))


def _target_speed(route: _Route, v_allow: np.ndarray, s: float, b: float = 1.2, look: float = 70.0) -> float:
    sel = (route.s >= s - 1.0) & (route.s <= s + look)
    if not np.any(sel):
        return float(v_allow[-1])
    ds = np.maximum(route.s[sel] - s, 0.0)
    return float(np.min(np.sqrt(v_allow[sel] ** 2 + 2 * b * ds)))


def _expert_rollout(route: _Route, v_allow: np.ndarray, v0: float, a0: float, obj_boxes: np.ndarray,
                    obj_valid: np.ndarray, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """IDM along the route (keeps distance to objects in the route corridor), jerk-limited.

    Returns arc lengths [n_steps+1] and accelerations [n_steps+1] at 0.1 s."""
    a_max, b_comf, s_min, t_head, jerk = 1.2, 1.8, 3.0, 1.4, 2.5
    F, A = obj_valid.shape
    proj_s = np.full((F, A), np.inf)
    proj_d = np.full((F, A), np.inf)
    for f in range(F):
        idx = np.nonzero(obj_valid[f])[0]
        if len(idx):
            s, d = route.project(obj_boxes[f, idx, :2])
            proj_s[f, idx], proj_d[f, idx] = s, d
    half_w = obj_boxes[0, :, 4] / 2
    corridor = EGO_WIDTH / 2 + half_w + 0.4
    s_ego, v, a = 0.0, v0, a0
    out_s, out_a = [s_ego], [a0]
    for t in range(n_steps):
        f = min(t, F - 1)
        v_t = max(_target_speed(route, v_allow, s_ego), 0.1)
        inlane = (np.abs(proj_d[f]) < corridor) & (proj_s[f] > s_ego + EGO_REAR_AXLE_TO_CENTER)
        acc_free = a_max * (1 - (v / v_t) ** 4)
        acc = acc_free
        if np.any(inlane):
            j = np.nonzero(inlane)[0]
            gaps = proj_s[f, j] - obj_boxes[f, j, 3] / 2 - (s_ego + EGO_FRONT)
            k = int(np.argmin(gaps))
            gap = max(float(gaps[k]), 0.1)
            f2 = min(f + 1, F - 1)
            v_lead = (proj_s[f2, j[k]] - proj_s[f, j[k]]) / DT if np.isfinite(proj_s[f2, j[k]]) else 0.0
            v_lead = max(v_lead, 0.0)
            s_star = s_min + v * t_head + v * (v - v_lead) / (2 * math.sqrt(a_max * b_comf))
            acc = a_max * (1 - (v / v_t) ** 4 - (max(s_star, 0.0) / gap) ** 2)
        acc = float(np.clip(acc, -4.0, a_max))
        acc = float(np.clip(acc, a - jerk * DT, a + jerk * DT))
        if v <= 0.0 and acc < 0.0:
            acc = 0.0
        v_new = max(v + acc * DT, 0.0)
        s_ego += 0.5 * (v + v_new) * DT
        v, a = v_new, acc
        out_s.append(s_ego)
        out_a.append(a)
    return np.array(out_s), np.array(out_a)


# ---------------------------------------------------------------------------------------------------------------
# Objects.


def _box_corners(x, y, h, length, width):
    c, s = np.cos(h), np.sin(h)
    dx = np.array([1, 1, -1, -1]) * length / 2
    dy = np.array([1, -1, -1, 1]) * width / 2
    return np.stack([x + c * dx - s * dy, y + s * dx + c * dy], -1)


def _boxes_overlap(b1, b2, margin=0.0) -> bool:
    """SAT overlap test of two (x, y, h, l, w) boxes, each inflated by `margin`."""
    c1 = _box_corners(b1[0], b1[1], b1[2], b1[3] + 2 * margin, b1[4] + 2 * margin)
    c2 = _box_corners(b2[0], b2[1], b2[2], b2[3] + 2 * margin, b2[4] + 2 * margin)
    for h in (b1[2], b1[2] + np.pi / 2, b2[2], b2[2] + np.pi / 2):
        ax = np.array([np.cos(h), np.sin(h)])
        p1, p2 = c1 @ ax, c2 @ ax
        if p1.max() < p2.min() or p2.max() < p1.min():
            return False
    return True


def _lane_motion(path: np.ndarray, s0: float, v0: float, acc: float, n: int):
    """Boxes' centre poses along a lane path at 0.1 s frames (speed clipped at 0) and per-frame validity."""
    t = np.arange(n) * DT
    v = np.maximum(v0 + acc * t, 0.0)
    s = s0 + np.concatenate([[0.0], np.cumsum(0.5 * (v[1:] + v[:-1]) * DT)])
    cum = _arclength(path)
    poses = _interp_path(path, s, cum)
    valid = s <= cum[-1] + 5.0
    return poses, valid


# ---------------------------------------------------------------------------------------------------------------
# Scene generation.


REFERENCES = ("expert", "pdm_closed")  # what `ref_poses` (EP's best-progress reference) holds
DEFAULT_REFERENCE = "pdm_closed"


def generate_scene(seed: int, kind: str | None = None, domain: str | None = None,
                   reference: str = DEFAULT_REFERENCE) -> Scene:
    """A deterministic scene for `seed` (same seed -> identical arrays). `kind`/`domain` override the draw.

    reference: "expert" (the rule-based expert's own 0.1 s poses) or "pdm_closed" (NAVSIM's PDM-Closed run on
    the scene at its speed limit, `sim/pdm_closed.py`: NAVSIM's EP reference)."""
    scene, v_limit = _generate(seed, kind, domain)
    return _with_reference([scene], [v_limit], reference)[0]


def _with_reference(scenes: list[Scene], limits, reference: str) -> list[Scene]:
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    if reference == "expert":
        return scenes
    from recogdrive_jax.sim import pdm_closed  # jax; imports this module
    return pdm_closed.with_reference(scenes, np.asarray(limits, np.float64))


def _generate(seed: int, kind: str | None, domain: str | None) -> tuple[Scene, float]:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2024]))
    kind_i = int(rng.integers(0, 3)) if kind is None else SCENE_KINDS.index(kind)
    dom_i = int(rng.choice(3, p=[0.6, 0.2, 0.2])) if domain is None else DOMAINS.index(domain)
    kind_name = SCENE_KINDS[kind_i]
    if kind_name == "junction":
        layout = _junction_roads(rng)
    else:
        layout = _open_road(rng, curved=kind_name == "curve")
    route = _Route(layout["route"])
    v_limit = float(rng.uniform(8.0, 15.0))
    v_allow = _allowed_speed(route, v_limit)

    # Ego initial state.
    v_cap = min(v_limit, _target_speed(route, v_allow, 0.0, b=1.0))
    v0 = float(rng.uniform(0.0, v_cap)) if rng.random() > 0.1 else 0.0
    a0 = float(rng.uniform(-0.5, 0.5)) if v0 > 1.0 else float(rng.uniform(0.0, 0.5))

    # Objects.
    boxes = np.zeros((NUM_FRAMES, MAX_OBJECTS, 5))
    valid = np.zeros((NUM_FRAMES, MAX_OBJECTS), bool)
    otype = np.zeros(MAX_OBJECTS, np.int32)
    ospeed = np.zeros(MAX_OBJECTS)
    ego_box0 = np.array([EGO_REAR_AXLE_TO_CENTER, 0.0, 0.0, EGO_LENGTH, EGO_WIDTH])
    n_obj = 0

    def add(poses, vmask, length, width, typ, speed) -> bool:
        nonlocal n_obj
        if n_obj >= MAX_OBJECTS:
            return False
        b0 = np.array([poses[0, 0], poses[0, 1], poses[0, 2], length, width])
        if _boxes_overlap(b0, ego_box0, margin=1.5):
            return False
        for j in range(n_obj):
            if _boxes_overlap(b0, boxes[0, j], margin=1.0):
                return False
        boxes[:, n_obj, :3] = poses
        boxes[:, n_obj, 3], boxes[:, n_obj, 4] = length, width
        valid[:, n_obj] = vmask
        otype[n_obj], ospeed[n_obj] = typ, speed
        n_obj += 1
        return True

    lanes = layout["lanes"]
    ego_lane_role = lanes[layout["ego_lane"]]["role"]
    for ln in lanes:
        if ln["connector"]:
            continue
        path = ln["path"]
        cum = _arclength(path)
        road, direction, _ = ln["role"]
        n_here = int(rng.integers(0, 3))
        for _ in range(n_here):
            length, width = rng.uniform(4.2, 5.2), rng.uniform(1.8, 2.1)
            if kind_name == "junction" and road != "in" and direction == "back":
                # Cross traffic waits at the stop line (queue), never entering the junction.
                s0 = cum[-1] - 3.0 - rng.uniform(0.0, 1.0) - 7.0 * rng.integers(0, 3)
                poses, vm = _lane_motion(path, s0, 0.0, 0.0, NUM_FRAMES)
                add(poses, vm, length, width, OBJ_VEHICLE, 0.0)
                continue
            # Position relative to the ego: project the ego's origin onto this lane.
            s_ego_here = float(_Route._project_xy(path, cum, np.zeros((1, 2)))[0][0])
            same_lane = ln["role"] == ego_lane_role or (
                kind_name == "junction" and ln["role"] == (layout.get("choice"), "fwd", layout["ego_lane"]))
            if same_lane:
                if rng.random() < 0.75:  # leader ahead
                    v = float(rng.uniform(0.0, v_limit))
                    gap = 4.0 + 1.6 * v0 + max(v0 - v, 0.0) ** 2 / 3.0 + rng.uniform(0.0, 30.0)
                    if road != "in" and kind_name == "junction":
                        s0 = float(rng.uniform(8.0, 50.0))
                    else:
                        s0 = s_ego_here + EGO_FRONT + length / 2 + gap
                    a = float(rng.uniform(-0.6, 0.3)) if v > 1 else 0.0
                else:  # follower behind, slower than the ego so it never rear-ends it
                    v = float(rng.uniform(0.0, max(v0 - 1.0, 0.0)))
                    s0 = s_ego_here - EGO_REAR - length / 2 - rng.uniform(4.0, 20.0)
                    a = 0.0
            else:
                v = float(rng.uniform(0.0, v_limit)) if rng.random() > 0.2 else 0.0
                s0 = float(rng.uniform(max(s_ego_here - 40.0, 5.0), min(s_ego_here + 90.0, cum[-1] - 5.0)))
                a = float(rng.uniform(-0.5, 0.5)) if v > 1 else 0.0
            if s0 > cum[-1] - 3.0 or s0 < 2.0:
                continue
            poses, vm = _lane_motion(path, s0, v, a, NUM_FRAMES)
            add(poses, vm, length, width, OBJ_VEHICLE if v > 0 else OBJ_PARKED, v)

    # Static obstacles: cones / barriers near the right road edge, sometimes one in the ego lane ahead.
    ego_path = lanes[layout["ego_lane"]]["path"]
    right_lane = lanes[layout["n_fwd"] - 1]["path"]
    for _ in range(int(rng.integers(0, 4))):
        cum = _arclength(right_lane)
        s0 = float(rng.uniform(10.0, min(cum[-1] - 5.0, 150.0)))
        pose = _interp_path(right_lane, np.array([s0]), cum)
        pose = _offset(pose, -(LANE_WIDTH / 2 - 0.35))
        typ = OBJ_CONE if rng.random() < 0.6 else OBJ_BARRIER
        size = (0.5, 0.5) if typ == OBJ_CONE else (0.5, 1.6)
        box_pose = pose.copy()
        if typ == OBJ_BARRIER:  # barrier along the road edge
            size = (1.6, 0.4)
        add(np.repeat(box_pose, NUM_FRAMES, 0), np.ones(NUM_FRAMES, bool), size[0], size[1], typ, 0.0)
    if rng.random() < 0.25 and kind_name != "junction":
        cum = _arclength(ego_path)
        s_ego_here = float(_Route._project_xy(ego_path, cum, np.zeros((1, 2)))[0][0])
        stop_dist = v0 ** 2 / (2 * 1.5) + 12.0
        s0 = s_ego_here + EGO_FRONT + stop_dist + rng.uniform(0.0, 40.0)
        pose = _interp_path(ego_path, np.array([s0]), cum)
        typ = OBJ_BARRIER if rng.random() < 0.5 else OBJ_PARKED
        size = (0.6, 2.4) if typ == OBJ_BARRIER else (4.6, 1.9)
        add(np.repeat(pose, NUM_FRAMES, 0), np.ones(NUM_FRAMES, bool), size[0], size[1], typ, 0.0)

    # Expert.
    n_steps = NUM_FRAMES - 1
    s_traj, a_traj = _expert_rollout(route, v_allow, v0, a0, boxes, valid, n_steps)
    poses10 = route.pose(s_traj)  # [51, 3]
    poses10[0] = 0.0
    ref = poses10[:NUM_SIM_STATES]
    expert = poses10[5:NUM_SIM_STATES:5]

    # History: constant acceleration backwards along the route, speed clipped at 0.
    t_hist = -np.arange(15, -1, -1) * DT  # -1.5 .. 0
    tau = np.linspace(0.0, 1.5, 301)
    v_back = np.maximum(v0 - a0 * tau, 0.0)  # speed at time -tau
    s_back = np.concatenate([[0.0], np.cumsum(0.5 * (v_back[1:] + v_back[:-1]) * (tau[1] - tau[0]))])
    s_hist = -np.interp(-t_hist, tau, s_back)
    hist_poses = route.pose(s_hist)
    hist_poses[-1] = 0.0
    history = hist_poses[[0, 5, 10, 15]]
    a_hist = np.where(v0 - a0 * (-t_hist[:14]) > 0.0, a0, 0.0)
    hist10 = np.zeros((NUM_HIST10, 5))
    hist10[:, 0] = hist_poses[:14, 2]
    hist10[:, 1] = a_hist

    # Command from the route's heading change 40 m ahead.
    h_ahead = float(route.pose(np.array([40.0]))[0, 2])
    if kind_name == "junction":
        cmd = COMMANDS.index(layout["choice"])
    else:
        cmd = 0 if h_ahead > 0.6 else 2 if h_ahead < -0.6 else 1
    status = np.zeros(8)
    status[cmd] = 1.0
    status[4:6] = (v0, 0.0)
    status[6:8] = (a0, 0.0)

    # Pack arrays.
    def polys(lst, cap):
        arr = np.zeros((cap, POLY_VERTS, 2))
        mask = np.zeros(cap, bool)
        for i, p in enumerate(lst[:cap]):
            arr[i] = _pad_poly(p)
            mask[i] = True
        return arr, mask

    drivable, drivable_mask = polys(layout["drivable"], MAX_DRIVABLE)
    lane_arr, lane_mask = polys([ln["polygon"] for ln in lanes], MAX_LANES)
    on_route = np.zeros(MAX_LANES, bool)
    on_route[: len(lanes)] = [ln["on_route"] for ln in lanes][:MAX_LANES]
    inter, inter_mask = polys(layout["intersections"], MAX_INTERSECTIONS)
    sel = (route.s >= -40.0)
    cl = route.path[sel][:CENTERLINE_LEN]
    centerline = np.repeat(cl[-1:], CENTERLINE_LEN, 0)
    centerline[: len(cl)] = cl
    cl_mask = np.zeros(CENTERLINE_LEN, bool)
    cl_mask[: len(cl)] = True

    # Invalid frames get the last valid pose (keeps arrays finite); masks say they are absent.
    scene = Scene(
        history=history, status=status, expert=expert, ref_poses=ref, hist10=hist10,
        obj_boxes=boxes, obj_valid=valid, obj_type=otype, obj_speed=ospeed,
        drivable=drivable, drivable_mask=drivable_mask, lanes=lane_arr, lane_mask=lane_mask,
        lane_on_route=on_route, intersections=inter, intersection_mask=inter_mask,
        centerline=centerline, centerline_mask=cl_mask,
        command=np.array(cmd), kind=np.array(kind_i), domain=np.array(dom_i), seed=np.array(int(seed)),
    )
    return _cast(scene), v_limit


# Scenes already made in this process, by (per-scene seed, kind, domain, reference): a pipeline's steps (cache, il,
# rl, eval) ask for overlapping scene sets, and each scene (its PDM-Closed reference above all) costs tens of ms.
# Bounded FIFO (~50 KB a scene); callers always get copies, so nothing they change reaches the memo.
_MEMO: "collections.OrderedDict[tuple, Scene]" = collections.OrderedDict()
MEMO_MAX_SCENES = 4096


def _copy(scene: Scene) -> Scene:
    return Scene(**{k: np.array(getattr(scene, k)) for k in SCENE_SCHEMA})


def generate_scenes(num_scenes: int, seed: int = 0, kind: str | None = None, domain: str | None = None,
                    reference: str = DEFAULT_REFERENCE) -> list[Scene]:
    """`num_scenes` scenes with per-scene seeds derived from `seed` (scene i uses seed * 1_000_003 + i); a
    PDM-Closed `reference` is computed in batches (once per scene, stored in `ref_poses`)."""
    from recogdrive_jax.train.metrics import track  # rate/ETA: thousands of scenes take minutes
    keys = [(seed * 1_000_003 + i, kind, domain, reference) for i in range(num_scenes)]
    todo = [k for k in keys if k not in _MEMO]
    if todo:
        made = [_generate(k[0], kind, domain) for k in track(todo, desc="scenes", unit="scenes")]
        for k, scene in zip(todo, _with_reference([m[0] for m in made], [m[1] for m in made], reference)):
            _MEMO[k] = scene
            while len(_MEMO) > max(MEMO_MAX_SCENES, num_scenes):
                _MEMO.popitem(last=False)
    return [_copy(_MEMO[k]) for k in keys]


def ego_state_summary(scene: Scene) -> dict:
    """Human-readable ego state used by QA and captions."""
    st = np.asarray(scene.status)
    return dict(command=COMMANDS[int(np.argmax(st[:4]))], speed=float(np.hypot(st[4], st[5])),
                accel=float(st[6]))


def past_scene(scene: Scene, k: int) -> Scene:
    """The (unbatched) scene as seen from the ego's past pose `history[k]` (k = 0..NUM_HISTORY-1 at -1.5, -1.0,
    -0.5, 0 s): every map polygon, the centreline and the agents re-expressed in that pose's ego frame, with frame 0 of
    `obj_boxes` moved back to that instant — agents are extrapolated backwards at their frame 0 -> 1 velocity (the
    world stores no agent past; lane followers move smoothly, so this is close for 1.5 s). What `render.render_front`
    draws for the history frames of the OpenTrackVLA recipe; only frame 0 of the agents is meaningful."""
    k = int(k)
    if not 0 <= k < NUM_HISTORY:
        raise ValueError(f"past_scene: history index {k} not in [0, {NUM_HISTORY})")
    x0, y0, h0 = (float(v) for v in np.asarray(scene.history)[k])
    c, s = math.cos(h0), math.sin(h0)

    def xy(p: np.ndarray) -> np.ndarray:  # [..., 2] current ego frame -> past ego frame
        d = np.asarray(p, np.float64) - (x0, y0)
        return np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], -1).astype(np.float32)

    tau = (NUM_HISTORY - 1 - k) * PLAN_DT  # seconds before t = 0
    boxes = np.array(scene.obj_boxes, np.float32)
    valid = np.array(scene.obj_valid, bool)
    vel = np.where((valid[0] & valid[1])[:, None], (boxes[1, :, :2] - boxes[0, :, :2]) / DT, 0.0)  # [A, 2]
    boxes[0, :, :2] = boxes[0, :, :2] - tau * vel
    boxes[..., :2] = xy(boxes[..., :2])
    boxes[..., 2] = wrap_angle(boxes[..., 2] - h0)
    centerline = np.array(scene.centerline, np.float32)
    centerline[:, :2] = xy(centerline[:, :2])
    centerline[:, 2] = wrap_angle(centerline[:, 2] - h0)
    return dataclasses.replace(scene, obj_boxes=boxes, drivable=xy(scene.drivable), lanes=xy(scene.lanes),
                               intersections=xy(scene.intersections), centerline=centerline)
