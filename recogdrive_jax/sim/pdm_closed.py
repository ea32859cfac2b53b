"""PDM-Closed (the planner whose trajectory is NAVSIM's EP reference) in JAX, batched over scenes in one jitted call.

Re-implements navsim v1.1's `AbstractPDMClosedPlanner._get_closed_loop_trajectory` as `MetricCacheProcessor`
configures it, including its quirks, so that the same proposal wins:
- 3 paths: the route centreline and its +-1 m parallels (`parallel_discrete_path`), as PDMPaths (headings
  unwrapped, linear interpolation in progress, distances clipped to [1e-5, length]);
- 5 IDM policies at 0.2..1.0 x the speed limit (15 m/s fallback), min gap 1 m, headway 1.5 s, a_max 1.5,
  b_max 3, exponent 10, explicit Euler at 0.1 s; 15 proposals, 40 steps, then the winner alone to 50;
- leading agents every 2nd step from constant-velocity forecasts (t0 boxes moved by |v| along the track heading,
  sampled every 0.2 s; objects > 100 m from the ego or overlapping it at t0 are dropped / ignored): objects whose
  box intersects the driving corridor (the path from the ego's progress, speed-limit x 5 s long, buffered by half
  the ego width with square caps and round joins), ahead in progress, nearest by polygon distance to the ego box;
  odd steps reuse the previous step's leader, so step 1 sees an all-zero leader (a full -3 m/s^2 brake), and one
  leader record is shared by the 5 policies of a path within a step (a policy with no leader keeps the previous
  policy's velocity; one with a leader keeps its rear length);
- every proposal tracked by the same LQR + bicycle model and scored by the same PDM scorer (`pdm.measure`) on the
  forecast observation, EP normalised among the proposals, best = first argmax of NC*DAC*(5 EP + 5 TTC + 2 C)/12.
Runs in float64 (scoped `jax.enable_x64`; the proposals' corridor and distance tests sit on cm-scale margins).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from recogdrive_jax.sim import pdm, world
from recogdrive_jax.sim.world import Scene

SPEED_FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)
LATERAL_OFFSETS = (0.0, -1.0, 1.0)  # the centreline first, then NAVSIM's lateral_offsets [-1, 1] (+ = left)
FALLBACK_SPEED = 15.0  # m/s, IDM target without a speed limit
MIN_GAP, HEADWAY, ACCEL_MAX, DECEL_MAX, IDM_EXPONENT = 1.0, 1.5, 1.5, 3.0, 10
N_PROPOSAL_STEPS = 40  # proposals: 4 s at 0.1 s
N_TRAJECTORY_STEPS = 50  # the returned trajectory: 5 s at 0.1 s
LEAD_UPDATE = 2  # leading agents are searched every 2nd step
OBS_RES = 2  # forecast occupancy maps every 2nd frame
MAP_RADIUS = 100.0
N_PATHS, N_POLICIES = len(LATERAL_OFFSETS), len(SPEED_FRACTIONS)
N_PROPOSALS = N_PATHS * N_POLICIES  # proposal index = path * 5 + policy
HALF_WIDTH = world.EGO_WIDTH / 2


# ---------------------------------------------------------------------------------------------------------------
# Paths.


def _paths(centerline, mask):
    """Proposal paths [B, 3, C, 3] (x, y, unwrapped heading), progress [B, 3, C] (+inf past the last real point)
    and length [B, 3]. Padded centreline points are dropped as the reference does (repeats of the last point)."""
    cl = centerline  # [B, C, 3]
    h = cl[..., 2]
    paths = []
    for off in LATERAL_OFFSETS:
        if off == 0.0:
            xy = cl[..., :2]
        else:
            xy = jnp.stack([cl[..., 0] + jnp.cos(h + np.pi / 2) * off, cl[..., 1] + jnp.sin(h + np.pi / 2) * off], -1)
        paths.append(jnp.concatenate([xy, h[..., None]], -1))
    p = jnp.stack(paths, 1)  # [B, 3, C, 3]
    p = p.at[..., 2].set(pdm._unwrap(p[..., 2]))  # np.unwrap semantics
    seg = jnp.sqrt(jnp.sum(jnp.diff(p[..., :2], axis=-2) ** 2, -1))  # [B, 3, C-1]
    prog = jnp.concatenate([jnp.zeros_like(seg[..., :1]), jnp.cumsum(seg, -1)], -1)
    n = jnp.sum(mask, -1)  # [B] real points
    length = jnp.take_along_axis(prog, jnp.broadcast_to((n - 1)[:, None, None], prog.shape[:2] + (1,)), -1)[..., 0]
    real = jnp.arange(cl.shape[1])[None, None] < n[:, None, None]
    return p, jnp.where(real, prog, jnp.inf), length, n


def _interpolate(path, prog, length, n, dist):
    """PDMPath.interpolate: poses [B, 3, K, 3] at distances dist [B, 3, K] along each path."""
    d = jnp.clip(dist, 1e-5, length[..., None])
    idx = jax.vmap(jax.vmap(lambda pr, q: jnp.searchsorted(pr, q, side="right")))(prog, d) - 1
    idx = jnp.clip(idx, 0, (n - 2)[:, None, None])
    p0 = jnp.take_along_axis(prog, idx, -1)
    p1 = jnp.take_along_axis(prog, idx + 1, -1)
    w = (d - p0) / jnp.where(p1 > p0, p1 - p0, 1.0)
    a = jnp.take_along_axis(path, idx[..., None], -2)
    b = jnp.take_along_axis(path, (idx + 1)[..., None], -2)
    out = a + (b - a) * w[..., None]
    return out.at[..., 2].set(jnp.arctan2(jnp.sin(out[..., 2]), jnp.cos(out[..., 2])))


# ---------------------------------------------------------------------------------------------------------------
# Geometry: boxes as (centre [..., 2], heading [...], (half length, half width)).


def _corners(c, h, hl, hw):
    """[..., 4, 2] corners of oriented boxes."""
    co, si = jnp.cos(h), jnp.sin(h)
    sl = jnp.array([1.0, -1.0, -1.0, 1.0], c.dtype)
    sw = jnp.array([1.0, 1.0, -1.0, -1.0], c.dtype)
    hl, hw = jnp.asarray(hl)[..., None], jnp.asarray(hw)[..., None]
    x = c[..., 0:1] + sl * hl * co[..., None] - sw * hw * si[..., None]
    y = c[..., 1:2] + sl * hl * si[..., None] + sw * hw * co[..., None]
    return jnp.stack([x, y], -1)


def _point_segment_distance(p, a, b):
    """|p - nearest point of segment ab|; p, a, b [..., 2] broadcastable."""
    ab = b - a
    ap = p - a
    s2 = jnp.sum(ab * ab, -1)
    t = jnp.clip(jnp.sum(ap * ab, -1) / jnp.where(s2 > 0, s2, 1.0), 0.0, 1.0)
    return jnp.sqrt(jnp.sum((ap - t[..., None] * ab) ** 2, -1))


def _box_distance(c1, h1, half1, c2, h2, half2):
    """Shapely polygon distance of two oriented boxes: 0 when they intersect, else the smallest vertex-edge gap."""
    k1 = _corners(c1, h1, *half1)  # [..., 4, 2]
    k2 = _corners(c2, h2, *half2)
    e1a, e1b = k1, jnp.roll(k1, -1, -2)
    e2a, e2b = k2, jnp.roll(k2, -1, -2)
    d12 = _point_segment_distance(k1[..., :, None, :], e2a[..., None, :, :], e2b[..., None, :, :])  # [..., 4, 4]
    d21 = _point_segment_distance(k2[..., :, None, :], e1a[..., None, :, :], e1b[..., None, :, :])
    d = jnp.minimum(d12.min((-1, -2)), d21.min((-1, -2)))
    hit = pdm.boxes_intersect(c1, h1, half1, c2, h2, half2)
    return jnp.where(hit, 0.0, d)


def _corridor_hits(path, prog, start, end, oc, oh, ohalf):
    """Which boxes intersect the buffered path substring [start, end] (PDMPath.substring's fast path: the
    vertices whose progress lies in the interval), buffer = half the ego width, square caps, round joins: the
    union of one rectangle per segment (the end ones extended by the buffer) and a disc at each inner vertex.

    path [B, 3, C, 3], prog [B, 3, C], start/end [B, 3]; boxes oc [B, 1 or 3, K, A, 2], oh / ohalf [B, 1 or 3,
    K, A]. Returns [B, 3, K, A] bool. The boxes' axes are computed once, outside the loop over segments."""
    inside = (prog >= start[..., None]) & (prog <= end[..., None])  # [B, 3, C]
    a, b = path[..., :-1, :2], path[..., 1:, :2]
    seg_len = jnp.sqrt(jnp.sum((b - a) ** 2, -1))  # [B, 3, C-1]
    seg_ok = inside[..., :-1] & inside[..., 1:] & (seg_len > 0)
    n_seg = seg_ok.shape[-1]
    iota = jnp.arange(n_seg)
    first = jnp.min(jnp.where(seg_ok, iota, n_seg), -1)  # [B, 3]
    last = jnp.max(jnp.where(seg_ok, iota, -1), -1)
    u = (b - a) / jnp.where(seg_len > 0, seg_len, 1.0)[..., None]
    ext_back = jnp.where(iota == first[..., None], HALF_WIDTH, 0.0)  # square caps
    ext_fwd = jnp.where(iota == last[..., None], HALF_WIDTH, 0.0)
    centre = 0.5 * ((a - ext_back[..., None] * u) + (b + ext_fwd[..., None] * u))
    heading = jnp.arctan2(u[..., 1], u[..., 0])
    seg_cos, seg_sin = jnp.cos(heading), jnp.sin(heading)
    half_len = 0.5 * (seg_len + ext_back + ext_fwd)
    prev_ok = jnp.concatenate([jnp.zeros_like(seg_ok[..., :1]), seg_ok[..., :-1]], -1)
    shape = jnp.broadcast_shapes(oc.shape[:-1], oh.shape, start.shape + (1, 1))
    bc = lambda v: jnp.broadcast_to(v, shape)  # noqa: E731
    ox, oy, l2, w2 = bc(oc[..., 0]), bc(oc[..., 1]), bc(ohalf[0]), bc(ohalf[1])
    co2, si2 = bc(jnp.cos(oh)), bc(jnp.sin(oh))
    ex = (...,) + (None,) * 2  # [B, 3] -> [B, 3, 1, 1] over (K, A)

    def body(i, hit):
        get = lambda v: jax.lax.dynamic_index_in_dim(v, i, -1, keepdims=False)[ex]  # noqa: E731
        get2 = lambda v: jax.lax.dynamic_index_in_dim(v, i, -2, keepdims=False)  # noqa: E731
        c1, v1 = get2(centre), get2(a)  # [B, 3, 2]
        co1, si1, l1 = get(seg_cos), get(seg_sin), get(half_len)
        dx, dy = ox - c1[..., 0][ex], oy - c1[..., 1][ex]
        c, s = co2 * co1 + si2 * si1, si2 * co1 - co2 * si1
        ac, as_ = jnp.abs(c), jnp.abs(s)
        sep = jnp.abs(co1 * dx + si1 * dy) > l1 + l2 * ac + w2 * as_  # SAT, as pdm.boxes_intersect
        sep |= jnp.abs(-si1 * dx + co1 * dy) > HALF_WIDTH + l2 * as_ + w2 * ac
        sep |= jnp.abs(co2 * dx + si2 * dy) > l2 + l1 * ac + HALF_WIDTH * as_
        sep |= jnp.abs(-si2 * dx + co2 * dy) > w2 + l1 * as_ + HALF_WIDTH * ac
        # round join at the segment's start vertex (previous segment in the corridor too): vertex-box distance
        rx, ry = v1[..., 0][ex] - ox, v1[..., 1][ex] - oy
        gx = jnp.maximum(jnp.abs(rx * co2 + ry * si2) - l2, 0.0)
        gy = jnp.maximum(jnp.abs(-rx * si2 + ry * co2) - w2, 0.0)
        join = get(prev_ok) & (gx * gx + gy * gy <= HALF_WIDTH * HALF_WIDTH)
        return hit | (get(seg_ok) & (~sep | join))

    return jax.lax.fori_loop(0, n_seg, body, jnp.zeros(shape, bool))


# ---------------------------------------------------------------------------------------------------------------
# Forecast observation.


def forecast(scene: Scene, dtype):
    """Constant-velocity forecast of the t0 objects (PDMObservation.update): boxes [B, F, A, 5] for frames
    0..50 (frame f holds the forecast at 2 * (f // 2) * 0.1 s), kept [B, A] (present at t0, within 100 m of the
    ego centre), ignored [B, A] (overlapping the ego at t0: "collided", never a leader, never scored)."""
    ob = jnp.asarray(scene.obj_boxes, dtype)[:, 0]  # [B, A, 5] at t0
    speed = jnp.asarray(scene.obj_speed, dtype)
    otype = scene.obj_type
    dynamic = (otype == world.OBJ_VEHICLE) | (otype == world.OBJ_PARKED)
    ego_c = jnp.array([world.EGO_REAR_AXLE_TO_CENTER, 0.0], dtype)
    near = jnp.sqrt(jnp.sum((ob[..., :2] - ego_c) ** 2, -1)) <= MAP_RADIUS
    kept = (otype > 0) & scene.obj_valid[:, 0] & near
    collided = kept & pdm.boxes_intersect(ego_c, jnp.zeros((), dtype), (pdm.HALF_LENGTH, pdm.HALF_WIDTH),
                                          ob[..., :2], ob[..., 2], (ob[..., 3] / 2, ob[..., 4] / 2))
    # velocity along the track heading (the exported velocity is speed * heading direction, so "drives forward")
    dxy = jnp.where(dynamic[..., None], speed[..., None] * jnp.stack([jnp.cos(ob[..., 2]), jnp.sin(ob[..., 2])], -1),
                    0.0)
    tau = (2 * (np.arange(world.NUM_FRAMES) // 2) * world.DT).astype(np.float64)  # [F]
    xy = ob[:, None, :, :2] + jnp.asarray(tau, dtype)[None, :, None, None] * dxy[:, None]
    boxes = jnp.concatenate([xy, jnp.broadcast_to(ob[:, None, :, 2:], xy.shape[:-1] + (3,))], -1)
    return boxes, kept, collided, dynamic, speed


# ---------------------------------------------------------------------------------------------------------------
# IDM unrolling.


def _idm_step(x, v, lead, target):
    """BatchIDMPolicy.propagate: one explicit Euler step of 0.1 s. lead = (progress, velocity, rear length)."""
    x_lead, v_lead, l_r = lead
    s_star = MIN_GAP + v * HEADWAY + v * (v - v_lead) / (2 * np.sqrt(ACCEL_MAX * DECEL_MAX))
    s_alpha = jnp.maximum(x_lead - x - l_r, MIN_GAP)
    v_dot = ACCEL_MAX * (1 - (v / target) ** IDM_EXPONENT - (s_star / s_alpha) ** 2)
    v_dot = jnp.clip(v_dot, -DECEL_MAX, ACCEL_MAX)
    return x + world.DT * v, v + world.DT * v_dot


def _leaders(t, x_prev, pose_prev, geo, shared: bool):
    """Leader records (progress, velocity, rear length) [B, 3, 5] at even step t (PDMGenerator._update_leading_agents).

    shared=True: one record per path carried through its 5 policies in order (the batched proposals);
    False: a fresh record per proposal (the winner's continuation past 4 s, unrolled alone)."""
    boxes, usable, obj_prog, dynamic, speed, length = geo  # even frames only: step t is entry t // 2
    k2 = t // LEAD_UPDATE
    ob = jax.lax.dynamic_index_in_dim(boxes, k2, 1, keepdims=False)  # [B, A, 5] forecast at step t
    use = jax.lax.dynamic_index_in_dim(usable, k2, 2, keepdims=False)  # [B, 3, A]
    o_prog = jax.lax.dynamic_index_in_dim(obj_prog, k2, 2, keepdims=False)  # [B, 3, A]
    ahead = use[:, :, None, :] & (o_prog[:, :, None, :] > x_prev[..., None])  # [B, 3, 5, A]
    fwd = jnp.stack([jnp.cos(pose_prev[..., 2]), jnp.sin(pose_prev[..., 2])], -1)
    ego_c = pose_prev[..., :2] + pdm.R2C * fwd  # [B, 3, 5, 2]
    o = ob[:, None, None]  # [B, 1, 1, A, 5]
    dist = _box_distance(ego_c[..., None, :], pose_prev[..., None, 2], (pdm.HALF_LENGTH, pdm.HALF_WIDTH),
                         o[..., :2], o[..., 2], (o[..., 3] / 2, o[..., 4] / 2))  # [B, 3, 5, A]
    dist = jnp.where(ahead, dist, jnp.inf)
    k = jnp.argmin(dist, -1)  # the first nearest
    any_ahead = jnp.any(ahead, -1)
    d_min = jnp.take_along_axis(dist, k[..., None], -1)[..., 0]
    rel = o[..., 2] - pose_prev[..., 2][..., None]
    v_proj = jnp.where(dynamic[:, None, None, :], speed[:, None, None, :] * jnp.cos(jnp.arctan2(jnp.sin(rel),
                                                                                              jnp.cos(rel))), 0.0)
    v_lead = jnp.take_along_axis(v_proj, k[..., None], -1)[..., 0]
    prog_lead = jnp.where(any_ahead, x_prev + d_min, length[..., None])
    if not shared:
        return prog_lead, jnp.where(any_ahead, v_lead, 0.0), jnp.where(any_ahead, 0.0, pdm.HALF_LENGTH)
    vel, rear = [], []
    carry_v = carry_r = jnp.zeros_like(length)
    for j in range(N_POLICIES):
        a = any_ahead[..., j]
        carry_v = jnp.where(a, v_lead[..., j], carry_v)
        carry_r = jnp.where(a, carry_r, pdm.HALF_LENGTH)
        vel.append(carry_v)
        rear.append(carry_r)
    return prog_lead, jnp.stack(vel, -1), jnp.stack(rear, -1)


def _unroll(state, t_first: int, n_pairs: int, targets, paths, geo, shared: bool):
    """IDM + path interpolation for steps t_first .. t_first + 2 n_pairs - 1 (t_first odd): the odd step reuses
    the current leader, the even one searches anew. state = (x, v, pose, lead) with x, v [B, 3, 5]."""
    path, prog, length, n = paths

    def step(x, v, lead):
        x, v = _idm_step(x, v, lead, targets)
        return x, v, _interpolate(path, prog, length, n, x)

    def pair(carry, t):
        x, v, pose, lead = carry
        x1, v1, pose1 = step(x, v, lead)  # odd step t
        lead = _leaders(t + 1, x1, pose1, geo, shared)
        x2, v2, pose2 = step(x1, v1, lead)  # even step t + 1
        return (x2, v2, pose2, lead), (jnp.stack([x1, x2], -1), jnp.stack([v1, v2], -1),
                                       jnp.stack([pose1, pose2], -2))

    ts = jnp.arange(t_first, t_first + 2 * n_pairs, 2)
    state, (xs, vs, poses) = jax.lax.scan(pair, state, ts)
    merge = lambda a: jnp.moveaxis(a, 0, 3).reshape(a.shape[1:4] + (-1,) + a.shape[5:])  # noqa: E731
    return state, merge(xs), merge(vs), merge(poses)


# ---------------------------------------------------------------------------------------------------------------
# The planner.


def _plan(scene: Scene, speed_limit):
    dtype = jnp.float64
    B = scene.status.shape[0]
    cl = jnp.asarray(scene.centerline, dtype)
    paths = _paths(cl, scene.centerline_mask)
    path, prog, length, n = paths
    limit = jnp.where(jnp.isfinite(speed_limit), speed_limit, FALLBACK_SPEED).astype(dtype)  # [B]
    targets = limit[:, None, None] * jnp.asarray(SPEED_FRACTIONS, dtype)  # [B, 1, 5]

    # Initial IDM state: progress of the rear axle on each path, the ego's longitudinal speed.
    e0, _ = pdm.project_on_polyline(jnp.zeros((B, N_PATHS, 1, 2), dtype), path[..., :2])  # [B, 3, 1]
    e0 = e0[..., 0]
    v0 = jnp.asarray(scene.status, dtype)[:, 4]
    x = jnp.broadcast_to(e0[..., None], (B, N_PATHS, N_POLICIES))
    v = jnp.broadcast_to(v0[:, None, None], x.shape)
    pose0 = _interpolate(path, prog, length, n, e0[..., None])  # [B, 3, 1, 3]
    pose = jnp.broadcast_to(pose0, x.shape + (3,))

    # Forecast, corridor membership and progress of every forecast box on every path. Leaders are searched at
    # even steps only, and the forecast changes every 2nd frame (frame 2k+1 = frame 2k), so these are computed on
    # the even frames alone (F2 = 26) and `_leaders` indexes them by step // 2: the same values, half the work.
    boxes, kept, collided, dynamic, speed = forecast(scene, dtype)  # [B, F, A, 5]
    start = jnp.clip(e0, 0.0, length)
    end = jnp.clip(e0 + limit[:, None] * N_TRAJECTORY_STEPS * world.DT, 0.0, length)
    ob = boxes[:, None, ::LEAD_UPDATE]  # [B, 1, F2, A, 5]
    in_corr = _corridor_hits(path, prog, start, end, ob[..., :2], ob[..., 2], (ob[..., 3] / 2, ob[..., 4] / 2))
    usable = in_corr & (kept & ~collided)[:, None, None, :]  # [B, 3, F2, A]
    F2, A = ob.shape[2:4]
    o_prog, _ = pdm.project_on_polyline(
        jnp.broadcast_to(ob[..., :2], (B, N_PATHS, F2, A, 2)).reshape(B, N_PATHS, F2 * A, 2), path[..., :2])
    geo = (boxes[:, ::LEAD_UPDATE], usable, o_prog.reshape(B, N_PATHS, F2, A), dynamic, speed, length)

    # 15 proposals over 4 s (one shared leader record per path and step), from an all-zero leader.
    zero = jnp.zeros_like(x)
    state = (x, v, pose, (zero, zero, zero))
    state, xs, vs, poses = _unroll(state, 1, N_PROPOSAL_STEPS // 2, targets, paths, geo, shared=True)
    poses = jnp.concatenate([pose[..., None, :], poses], -2)  # [B, 3, 5, 41, 3]

    # Track and score every proposal on the forecast observation; EP normalised among the proposals.
    keep = kept & ~collided
    fscene = dataclasses.replace(scene, obj_boxes=boxes, obj_valid=jnp.broadcast_to(keep[:, None], boxes.shape[:3]),
                                 obj_speed=speed)
    met = pdm.measure(fscene, poses.reshape(B, N_PROPOSALS, N_PROPOSAL_STEPS + 1, 3))
    mult = met["nc"] * met["dac"]
    raw = met["progress"] * mult
    best_raw = jnp.max(raw, -1, keepdims=True)
    ep = jnp.where(best_raw > 5.0, raw / jnp.where(best_raw > 5.0, best_raw, 1.0), jnp.where(mult == 0.0, 0.0, 1.0))
    scores = mult * (5.0 * ep + 5.0 * met["ttc"] + 2.0 * met["c"]) / 12.0  # [B, 15]
    best = jnp.argmax(scores, -1)

    # The winner alone from 4 s to 5 s (fresh leader records); computed for all, the winner's kept.
    _, _, _, tail = _unroll(state, N_PROPOSAL_STEPS + 1, (N_TRAJECTORY_STEPS - N_PROPOSAL_STEPS) // 2, targets,
                            paths, geo, shared=False)
    full = jnp.concatenate([poses, tail], -2).reshape(B, N_PROPOSALS, N_TRAJECTORY_STEPS + 1, 3)
    out = jnp.take_along_axis(full, best[:, None, None, None], 1)[:, 0]
    return dict(poses=out, best=best, scores=scores, proposals=full, ep=ep, nc=met["nc"], dac=met["dac"],
                ttc=met["ttc"], c=met["c"], progress=met["progress"])


_plan_jit = jax.jit(_plan)


def pdm_closed(scene: Scene, speed_limit=None) -> dict[str, np.ndarray]:
    """PDM-Closed for a batched `Scene`: speed_limit [B] m/s (NaN or None -> NAVSIM's 15 m/s fallback).

    Returns numpy float64: poses [B, 51, 3] (the winner, 0..5 s at 0.1 s, ego frame; row 0 is the path point
    at the ego's progress, as upstream), best [B] (proposal index = path * 5 + policy; paths: centreline, -1 m,
    +1 m), scores / ep / nc / dac / ttc / c / progress [B, 15] and proposals [B, 15, 51, 3] (unsimulated IDM
    poses). One compilation per batch shape; float64 in a scoped `jax.enable_x64`."""
    b = np.asarray(scene.status).shape[0]
    limit = np.full(b, np.nan) if speed_limit is None else np.broadcast_to(np.asarray(speed_limit, np.float64), (b,))
    with jax.enable_x64(True):
        out = _plan_jit(scene, jnp.asarray(limit, jnp.float64))
        return {k: np.asarray(v) for k, v in out.items()}


def with_reference(scenes: list[Scene], speed_limits: np.ndarray, chunk: int = 8) -> list[Scene]:
    """The scenes with `ref_poses` = their PDM-Closed trajectory (0..4 s), computed in batches of `chunk` (the
    last one padded), so a process compiles PDM-Closed once whatever the number of scenes."""
    out = []
    for s in range(0, len(scenes), chunk):
        part = list(scenes[s:s + chunk])
        lim = np.asarray(speed_limits[s:s + chunk], np.float64)
        n = len(part)
        pad = chunk - n
        batch = world.stack_scenes(part + part[-1:] * pad)
        poses = pdm_closed(batch, np.concatenate([lim, np.repeat(lim[-1:], pad)]))["poses"]
        out += [dataclasses.replace(sc, ref_poses=poses[i, :world.NUM_SIM_STATES].astype(np.float32))
                for i, sc in enumerate(part)]
    return out
