"""Convert a NAVSIM metric cache (lzma pickles) into a pickle-free scene store (`sim/scene_store.py` reads it).

    python -m recogdrive_jax.convert navsim-metric-cache IN_CACHE_DIR OUT.npz [--max_scenes N]
    # or, inside a NAVSIM environment without this package's dependencies (PYTHONPATH holding navsim + nuplan):
    python path/to/recogdrive_jax/convert/navsim_metric_cache.py IN_CACHE_DIR OUT.npz

Runs inside a user's NAVSIM environment (NAVSIM's old numpy, navsim + nuplan-devkit classes, shapely >= 2): numpy
and `sim/scene_format.py` (numpy only) are its only imports from outside NAVSIM, no jax (a test imports it with
`jax` blocked). The cache pickles NAVSIM classes, so unpickling executes code from the file: this explicit command
is one of the two places in the project that unpickles anything; run it only on caches you produced yourself.

Which files: the paths listed in `IN_CACHE_DIR/metadata/*.csv` (NAVSIM's metric caching writes them there, one per
line after a header; `MetricCacheLoader` reads them the same way), else every `**/metric_cache.pkl`. Each file is
`<cache>/<log>/<scenario_type>/<token>/metric_cache.pkl`; its parent folder's name is the sample token.

Mapping (spec/pdm.md §4), into the ego frame of the cached ego state (rear axle = origin):
- `ego_state` -> `status` (velocity, acceleration at the rear axle; command "unknown": the cache has none);
- the PDM-Closed `trajectory` sampled at 41 x 0.1 s as NAVSIM's `pdm_score` samples it -> `ref_poses`;
- the 51 observation frames -> `obj_boxes`/`obj_valid`: each frame's box comes from that frame's occupancy polygon
  (nuPlan box corners FL, RL, RR, FR -> centre, heading, length, width), so the boxes the project scores are the
  polygons NAVSIM scores; type and speed from `unique_objects` (nuPlan agent types -> car (stopped: parked car),
  traffic cones -> cone, other static objects -> barrier: they score NC 0.5); red-light entries are skipped;
- drivable-area-map polygons -> `drivable` (ROADBLOCK, INTERSECTION, DRIVABLE_AREA, CARPARK_AREA; identical
  rings once), `lanes` (LANE, LANE_CONNECTOR; on-route flag from `route_lane_ids`) and `intersections`;
- the route `centerline` (PDMPath) -> `centerline`: its own vertices when they fit CENTERLINE_LEN, else resampled
  at 1 m from 40 m behind the ego's projection (counted in the report);
- v2 caches also provide the human future (`expert`) and past (`history`); v1 caches use PDM-Closed's poses.
Simplifications forced by the fixed padded sizes of `Scene`: polygons with more than POLY_VERTS vertices are
simplified (shapely `simplify`, growing tolerance), and only the objects/polygons nearest the ego are kept when a
scene has more than the caps. Every such change is counted and printed at the end.
"""
from __future__ import annotations

import argparse
import csv
import glob
import lzma
import os
import pickle
import sys
import time

import numpy as np

try:
    from recogdrive_jax.sim import scene_format as fmt
except ImportError:  # run as a plain script where the package is not installed: import it from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from recogdrive_jax.sim import scene_format as fmt

NAVSIM_MISSING = ("navsim-metric-cache needs the optional NAVSIM install (the cache pickles navsim/nuplan classes): "
                  "pip install nuplan-devkit navsim (see NAVSIM's install guide), then rerun. Import error: {err}")
CENTERLINE_BEHIND = 40.0  # m of route kept behind the ego when a long centreline is resampled


def _require_navsim():
    try:
        import navsim  # noqa: F401
        from nuplan.common.actor_state.state_representation import StateSE2, TimePoint  # noqa: F401
        from nuplan.common.maps.abstract_map import SemanticMapLayer  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without navsim
        raise SystemExit(NAVSIM_MISSING.format(err=e)) from None


def _to_ego(xy: np.ndarray, origin: np.ndarray) -> np.ndarray:
    c, s = np.cos(origin[2]), np.sin(origin[2])
    d = xy - origin[:2]
    return np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], -1)


def _pose_to_ego(poses: np.ndarray, origin: np.ndarray) -> np.ndarray:
    return np.concatenate([_to_ego(poses[..., :2], origin), fmt.wrap_angle(poses[..., 2:3] - origin[2])], -1)


def _ring(poly) -> np.ndarray:
    """A shapely polygon's exterior vertices [K, 2] without the closing repeat."""
    return np.asarray(poly.exterior.coords)[:-1, :2]


def _poly_array(poly, origin, where: str, notes: dict) -> np.ndarray:
    """[POLY_VERTS, 2] ego-frame polygon; simplified (growing tolerance) when it has more vertices than fit."""
    ring = _ring(poly)
    tol = 0.0
    if len(ring) > fmt.POLY_VERTS:
        notes["polygons_simplified"] += 1
    while len(ring) > fmt.POLY_VERTS:
        tol = 0.05 if tol == 0 else tol * 2
        if tol > 50:
            raise ValueError(f"{where}: cannot simplify a map polygon to {fmt.POLY_VERTS} vertices")
        ring = _ring(poly.simplify(tol, preserve_topology=True))
    return fmt.pad_poly(_to_ego(ring, origin))


def _box_from_polygon(poly, origin, where: str) -> np.ndarray:
    """(x, y, heading, length, width) in the ego frame of a nuPlan box polygon (corners FL, RL, RR, FR)."""
    c = _ring(poly)
    if len(c) != 4:
        raise ValueError(f"{where}: an object polygon has {len(c)} corners, expected a 4-corner nuPlan box")
    fl, rl, rr = c[0], c[1], c[2]
    centre = _to_ego(c.mean(0), origin)
    heading = np.arctan2(fl[1] - rl[1], fl[0] - rl[0]) - origin[2]
    return np.array([centre[0], centre[1], fmt.wrap_angle(heading), np.hypot(*(fl - rl)), np.hypot(*(rl - rr))])


def _nearest(items, k):
    items = sorted(items, key=lambda t: t[0])
    return items[:k], max(len(items) - k, 0)


def _centerline(states: np.ndarray, origin: np.ndarray, notes: dict) -> tuple[np.ndarray, np.ndarray]:
    """Route centreline [CENTERLINE_LEN, 3] + mask from the PDMPath's (x, y, heading) vertices (global frame)."""
    cl = _pose_to_ego(states, origin)
    keep = np.concatenate([[True], np.hypot(*np.diff(cl[:, :2], axis=0).T) > 1e-9])  # repeated points add nothing
    cl = cl[keep]
    if len(cl) > fmt.CENTERLINE_LEN:
        notes["centerlines_resampled"] += 1
        cum = fmt.arclength(cl)
        s_ego = fmt.project_to_path(cl, cum, np.zeros((1, 2)))[0][0]
        s = np.arange(max(s_ego - CENTERLINE_BEHIND, 0.0), cum[-1] + 1e-9, 1.0)[: fmt.CENTERLINE_LEN]
        cl = fmt.interp_path(cl, s, cum)
    out = np.repeat(cl[-1:], fmt.CENTERLINE_LEN, 0)
    out[: len(cl)] = cl
    return out, np.arange(fmt.CENTERLINE_LEN) < len(cl)


def new_notes() -> dict:
    """Counts of what the padded sizes forced the converter to change (printed at the end)."""
    return dict(objects_dropped=0, drivable_dropped=0, lanes_dropped=0, intersections_dropped=0,
                polygons_simplified=0, centerlines_resampled=0)


def convert_metric_cache(cache, where: str = "metric cache", notes: dict | None = None) -> fmt.Scene:
    """One unpickled NAVSIM `MetricCache` -> Scene (ego frame); `notes` (see `new_notes`) counts truncations."""
    from nuplan.common.actor_state.state_representation import TimePoint
    from nuplan.common.actor_state.tracked_objects_types import AGENT_TYPES, TrackedObjectType
    from nuplan.common.maps.abstract_map import SemanticMapLayer
    from shapely.geometry import Point

    notes = new_notes() if notes is None else notes
    ego = cache.ego_state
    origin = np.array([ego.rear_axle.x, ego.rear_axle.y, ego.rear_axle.heading])
    ego_pt = Point(origin[0], origin[1])
    status = np.zeros(8, np.float32)
    status[3] = 1.0  # command unknown: the metric cache does not store it
    dyn = ego.dynamic_car_state
    status[4:6] = (dyn.rear_axle_velocity_2d.x, dyn.rear_axle_velocity_2d.y)
    status[6:8] = (dyn.rear_axle_acceleration_2d.x, dyn.rear_axle_acceleration_2d.y)
    # EP's reference, sampled exactly as pdm_score's get_trajectory_as_array samples it (float seconds from the
    # initial state, truncated to us, clipped to the trajectory).
    traj = cache.trajectory
    times_s = np.arange(0.0, (fmt.NUM_SIM_STATES - 1) * fmt.DT + fmt.DT, fmt.DT) + ego.time_point.time_s
    times_us = np.clip([int(t * 1e6) for t in times_s], traj.start_time.time_us, traj.end_time.time_us)
    states = traj.get_state_at_times([TimePoint(int(t)) for t in times_us])
    ref = _pose_to_ego(np.asarray([[s.rear_axle.x, s.rear_axle.y, s.rear_axle.heading] for s in states]), origin)
    human = getattr(cache, "human_trajectory", None)
    if human is not None:
        expert = _pose_to_ego(np.asarray([[p.x, p.y, p.heading] for p in human.poses])[:fmt.NUM_PLAN_POSES], origin)
    else:
        expert = ref[5::5]
    history = np.zeros((fmt.NUM_HISTORY, 3))
    past = getattr(cache, "past_human_trajectory", None)
    if past is not None:
        ph = _pose_to_ego(np.asarray([[p.x, p.y, p.heading] for p in past.poses]), origin)[-fmt.NUM_HISTORY:]
        history[-len(ph):] = ph

    # Objects: the nearest MAX_OBJECTS (by their first-frame distance; absent at t = 0 -> last).
    obs = cache.observation
    uniq = obs.unique_objects
    frames = [obs[f] for f in range(fmt.NUM_FRAMES)]
    tokens = [t for t in uniq if obs.red_light_token not in t]
    first = frames[0].token_to_idx
    ranked, dropped = _nearest([(ego_pt.distance(frames[0][t]) if t in first else 1e9, t) for t in tokens],
                               fmt.MAX_OBJECTS)
    notes["objects_dropped"] += dropped
    boxes = np.zeros((fmt.NUM_FRAMES, fmt.MAX_OBJECTS, 5))
    valid = np.zeros((fmt.NUM_FRAMES, fmt.MAX_OBJECTS), bool)
    otype = np.zeros(fmt.MAX_OBJECTS, np.int32)
    ospeed = np.zeros(fmt.MAX_OBJECTS)
    for a, (_, tok) in enumerate(ranked):
        obj = uniq[tok]
        if obj.tracked_object_type in AGENT_TYPES:
            ospeed[a] = float(np.hypot(obj.velocity.x, obj.velocity.y))
            otype[a] = fmt.OBJ_VEHICLE if ospeed[a] > 0.05 else fmt.OBJ_PARKED
        else:  # static objects: always "stopped", an at-fault hit scores NC 0.5
            otype[a] = fmt.OBJ_CONE if obj.tracked_object_type == TrackedObjectType.TRAFFIC_CONE else fmt.OBJ_BARRIER
        for f, frame in enumerate(frames):
            if tok in frame.token_to_idx:
                boxes[f, a] = _box_from_polygon(frame[tok], origin, f"{where}: object {tok} frame {f}")
                valid[f, a] = True
        last = boxes[np.argmax(valid[:, a]), a].copy()
        for f in range(fmt.NUM_FRAMES):  # keep invalid frames finite
            if valid[f, a]:
                last = boxes[f, a].copy()
            else:
                boxes[f, a] = last

    # Map polygons.
    dmap = cache.drivable_area_map
    drv_types = {SemanticMapLayer.ROADBLOCK, SemanticMapLayer.INTERSECTION, SemanticMapLayer.DRIVABLE_AREA,
                 SemanticMapLayer.CARPARK_AREA}
    lane_types = {SemanticMapLayer.LANE, SemanticMapLayer.LANE_CONNECTOR}
    route = set(cache.route_lane_ids)
    drv, lanes, inters, seen = [], [], [], []
    for idx, tok in enumerate(dmap.tokens):  # map_types is a list in token order
        poly, layer = dmap[tok], dmap.map_types[idx]
        d = ego_pt.distance(poly)
        if layer in drv_types:
            ring = _ring(poly)
            if not any(r.shape == ring.shape and np.array_equal(r, ring) for r in seen):  # DAC: "any polygon"
                seen.append(ring)
                drv.append((d, poly))
        if layer in lane_types:
            lanes.append((d, (poly, tok in route)))
        if layer == SemanticMapLayer.INTERSECTION:
            inters.append((d, poly))
    drv, n = _nearest(drv, fmt.MAX_DRIVABLE)
    notes["drivable_dropped"] += n
    lanes, n = _nearest(lanes, fmt.MAX_LANES)
    notes["lanes_dropped"] += n
    inters, n = _nearest(inters, fmt.MAX_INTERSECTIONS)
    notes["intersections_dropped"] += n

    def pack(items, cap, getpoly):
        arr = np.zeros((cap, fmt.POLY_VERTS, 2))
        mask = np.zeros(cap, bool)
        for i, it in enumerate(items):
            arr[i] = _poly_array(getpoly(it[1]), origin, where, notes)
            mask[i] = True
        return arr, mask

    drivable, drivable_mask = pack(drv, fmt.MAX_DRIVABLE, lambda p: p)
    lane_arr, lane_mask = pack(lanes, fmt.MAX_LANES, lambda p: p[0])
    on_route = np.zeros(fmt.MAX_LANES, bool)
    on_route[: len(lanes)] = [p[1][1] for p in lanes]
    inter, inter_mask = pack(inters, fmt.MAX_INTERSECTIONS, lambda p: p)
    cl_states = np.asarray([[s.x, s.y, s.heading] for s in cache.centerline.discrete_path])
    centerline, cl_mask = _centerline(cl_states, origin, notes)
    scene = fmt.Scene(
        history=history, status=status, expert=expert, ref_poses=ref, hist10=np.zeros((fmt.NUM_HIST10, 5)),
        obj_boxes=boxes, obj_valid=valid, obj_type=otype, obj_speed=ospeed, drivable=drivable,
        drivable_mask=drivable_mask, lanes=lane_arr, lane_mask=lane_mask, lane_on_route=on_route,
        intersections=inter, intersection_mask=inter_mask, centerline=centerline, centerline_mask=cl_mask,
        command=np.array(3), kind=np.array(0), domain=np.array(0), seed=np.array(0))
    return fmt.cast_scene(scene)


def convert_cache_file(path: str, notes: dict | None = None) -> fmt.Scene:
    """One `metric_cache.pkl` (lzma pickle, as NAVSIM's `MetricCache.dump` writes it) -> Scene."""
    with lzma.open(path, "rb") as f:
        cache = pickle.load(f)  # explicit conversion command only (see module docstring)
    return convert_metric_cache(cache, path, notes)


def cache_paths(cache_dir: str) -> list[str]:
    """Paths listed in `<cache>/metadata/*.csv` (header + one path per line), else a recursive glob."""
    paths = []
    for csv_path in sorted(glob.glob(os.path.join(cache_dir, "metadata", "*.csv"))):
        with open(csv_path) as f:
            rows = list(csv.reader(f))
        paths += [r[0] for r in rows[1:] if r]
    if not paths:
        paths = sorted(glob.glob(os.path.join(cache_dir, "**", "metric_cache.pkl"), recursive=True))
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recogdrive_jax.convert navsim-metric-cache",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache_dir", help="NAVSIM metric cache directory (contains metadata/*.csv)")
    ap.add_argument("out", help="output scene store .npz")
    ap.add_argument("--max_scenes", type=int, default=None)
    args = ap.parse_args(argv)
    if not os.path.isdir(args.cache_dir):
        raise SystemExit(f"{args.cache_dir}: not a directory")
    _require_navsim()
    paths = cache_paths(args.cache_dir)[: args.max_scenes]
    if not paths:
        raise SystemExit(f"{args.cache_dir}: no metric_cache.pkl files found (metadata/*.csv or recursive glob)")
    scenes, tokens, notes = [], [], new_notes()
    start = last = time.time()
    for i, p in enumerate(paths):
        if not os.path.isfile(p):
            raise SystemExit(f"{p}: listed in {args.cache_dir}/metadata but missing")
        try:
            scenes.append(convert_cache_file(p, notes))
        except Exception as e:  # name the file; keep the original error
            raise SystemExit(f"{p}: conversion failed: {type(e).__name__}: {e}") from e
        tokens.append(os.path.basename(os.path.dirname(p)))  # NAVSIM's MetricCacheLoader: token = parent folder
        now = time.time()
        if now - last >= 20 or i + 1 == len(paths):  # plain progress line (no terminal UI inside a NAVSIM env)
            rate = (i + 1) / max(now - start, 1e-9)
            print(f"convert navsim-metric-cache: {i + 1}/{len(paths)} scenes, {rate:.1f}/s, "
                  f"ETA {(len(paths) - i - 1) / rate:.0f} s", file=sys.stderr, flush=True)
            last = now
    fmt.save_scene_arrays(args.out, scenes, extra={"tokens": np.array(tokens, dtype=str)})
    print(f"wrote {len(scenes)} scenes to {args.out}; changed to fit the padded sizes: {notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
