"""Convert a NAVSIM metric cache (lzma pickles) into a pickle-free scene store (`sim/scene_store.py`).

    python -m recogdrive_jax.convert navsim-metric-cache IN_CACHE_DIR OUT.npz [--max_scenes N]

Needs the optional NAVSIM install (navsim + nuplan-devkit, shapely >= 2) because the cache pickles NAVSIM
classes. This is the ONLY place in recogdrive-jax that unpickles anything, and only on this explicit command:
run it on caches you produced yourself (unpickling executes code from the file).

Mapping (spec/pdm.md §4): the t0 ego state becomes the origin of the ego frame; PDM-Closed's trajectory sampled at
41 × 0.1 s → `ref_poses`; the 51 observation frames → `obj_boxes`/`obj_valid` (static object types score
NC 0.5); the route centreline → `centerline` (1 m resampling); drivable-area-map polygons → `drivable`
(ROADBLOCK, INTERSECTION, DRIVABLE_AREA, CARPARK_AREA), `lanes` (LANE, LANE_CONNECTOR, on-route flag from
`route_lane_ids`) and `intersections`. Simplifications forced by the fixed padded sizes of `world.Scene`:
polygons are simplified (shapely `simplify`, growing tolerance) to at most `POLY_VERTS` vertices, and only the
polygons/objects nearest the ego are kept when a scene has more than the caps (counts are reported).
The sample token of each scene (its cache folder's name, as NAVSIM's `MetricCacheLoader` keys them) goes to the
`tokens` field, so `convert navsim-logs --metric_cache` and `data.navsim_metric_cache` can match scenes to samples.
v2 caches also provide the human future (`expert`) and past (`history`); v1 caches use PDM-Closed's poses.
"""
from __future__ import annotations

import argparse
import csv
import glob
import lzma
import os
import pickle
import sys

import numpy as np

from recogdrive_jax.sim import scene_store, world

NAVSIM_MISSING = ("navsim-metric-cache needs the optional NAVSIM install (the cache pickles navsim/nuplan classes): "
                  "pip install nuplan-devkit navsim (see NAVSIM's install guide), then rerun. Import error: {err}")


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
    return np.concatenate([_to_ego(poses[..., :2], origin), world.wrap_angle(poses[..., 2:3] - origin[2])], -1)


def _poly_array(poly, origin, path: str) -> np.ndarray:
    tol = 0.0
    ring = np.asarray(poly.exterior.coords)[:-1]
    while len(ring) > world.POLY_VERTS:
        tol = 0.05 if tol == 0 else tol * 2
        ring = np.asarray(poly.simplify(tol, preserve_topology=True).exterior.coords)[:-1]
        if tol > 50:
            raise ValueError(f"{path}: cannot simplify a map polygon to {world.POLY_VERTS} vertices")
    return world._pad_poly(_to_ego(ring, origin))


def _nearest(items, k):
    items = sorted(items, key=lambda t: t[0])
    return items[:k], max(len(items) - k, 0)


def convert_cache_file(path: str) -> tuple[world.Scene, dict]:
    """One `metric_cache.pkl` -> (Scene, notes about truncation)."""
    from nuplan.common.actor_state.state_representation import TimePoint
    from nuplan.common.maps.abstract_map import SemanticMapLayer
    from shapely.geometry import Point

    with lzma.open(path, "rb") as f:
        cache = pickle.load(f)  # explicit conversion command only (see module docstring)
    ego = cache.ego_state
    origin = np.array([ego.rear_axle.x, ego.rear_axle.y, ego.rear_axle.heading])
    ego_pt = Point(origin[0], origin[1])
    notes = {}
    status = np.zeros(8, np.float32)
    status[3] = 1.0  # command unknown: the metric cache does not store it
    dyn = ego.dynamic_car_state
    status[4:6] = (dyn.rear_axle_velocity_2d.x, dyn.rear_axle_velocity_2d.y)
    status[6:8] = (dyn.rear_axle_acceleration_2d.x, dyn.rear_axle_acceleration_2d.y)
    t0 = ego.time_point.time_us
    traj = cache.trajectory
    ref = []
    for i in range(world.NUM_SIM_STATES):
        t = min(t0 + int(i * 1e5), traj.end_time.time_us)
        s = traj.get_state_at_time(TimePoint(t))
        ref.append([s.rear_axle.x, s.rear_axle.y, s.rear_axle.heading])
    ref = _pose_to_ego(np.asarray(ref), origin)
    ref[0] = 0.0
    human = getattr(cache, "human_trajectory", None)
    if human is not None:
        expert = _pose_to_ego(np.asarray([[p.x, p.y, p.heading] for p in human.poses])[:8], origin)
    else:
        expert = ref[5::5]
    history = np.zeros((world.NUM_HISTORY, 3))
    past = getattr(cache, "past_human_trajectory", None)
    if past is not None:
        ph = _pose_to_ego(np.asarray([[p.x, p.y, p.heading] for p in past.poses]), origin)[-world.NUM_HISTORY:]
        history[-len(ph):] = ph
    # Objects.
    obs = cache.observation
    uniq = obs.unique_objects
    tokens = [t for t in uniq if "red_light" not in t]
    ranked, dropped = _nearest([(ego_pt.distance(obs[0][t]) if t in obs[0].tokens else 1e9, t) for t in tokens],
                               world.MAX_OBJECTS)
    notes["objects_dropped"] = dropped
    boxes = np.zeros((world.NUM_FRAMES, world.MAX_OBJECTS, 5))
    valid = np.zeros((world.NUM_FRAMES, world.MAX_OBJECTS), bool)
    otype = np.zeros(world.MAX_OBJECTS, np.int32)
    ospeed = np.zeros(world.MAX_OBJECTS)
    for a, (_, tok) in enumerate(ranked):
        obj = uniq[tok]
        kind = obj.tracked_object_type.name
        is_agent = kind in ("VEHICLE", "PEDESTRIAN", "BICYCLE", "EGO")
        speed = float(np.hypot(obj.velocity.x, obj.velocity.y)) if hasattr(obj, "velocity") else 0.0
        otype[a] = (world.OBJ_VEHICLE if speed > 0.05 else world.OBJ_PARKED) if is_agent else world.OBJ_BARRIER
        ospeed[a] = speed
        for f in range(min(world.NUM_FRAMES, len(obs))):
            frame = obs[f]
            if tok not in frame.tokens:
                continue
            c = frame[tok].centroid
            boxes[f, a, :2] = _to_ego(np.array([c.x, c.y]), origin)
            boxes[f, a, 2] = world.wrap_angle(obj.box.center.heading - origin[2])
            boxes[f, a, 3:] = (obj.box.length, obj.box.width)
            valid[f, a] = True
        last = boxes[0, a]
        for f in range(world.NUM_FRAMES):  # keep invalid frames finite
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
    drv, lanes, inters = [], [], []
    for tok in dmap.tokens:
        poly = dmap[tok]
        layer = dmap.map_types[tok] if hasattr(dmap, "map_types") else dmap._map_types[tok]
        d = ego_pt.distance(poly)
        if layer in drv_types:
            drv.append((d, poly))
        if layer in lane_types:
            lanes.append((d, (poly, tok in route)))
        if layer == SemanticMapLayer.INTERSECTION:
            inters.append((d, poly))
    drv, notes["drivable_dropped"] = _nearest(drv, world.MAX_DRIVABLE)
    lanes, notes["lanes_dropped"] = _nearest(lanes, world.MAX_LANES)
    inters, notes["intersections_dropped"] = _nearest(inters, world.MAX_INTERSECTIONS)

    def pack(items, cap, getpoly):
        arr = np.zeros((cap, world.POLY_VERTS, 2))
        mask = np.zeros(cap, bool)
        for i, it in enumerate(items):
            arr[i] = _poly_array(getpoly(it[1]), origin, path)
            mask[i] = True
        return arr, mask

    drivable, drivable_mask = pack(drv, world.MAX_DRIVABLE, lambda p: p)
    lane_arr, lane_mask = pack(lanes, world.MAX_LANES, lambda p: p[0])
    on_route = np.zeros(world.MAX_LANES, bool)
    on_route[: len(lanes)] = [p[1][1] for p in lanes]
    inter, inter_mask = pack(inters, world.MAX_INTERSECTIONS, lambda p: p)
    # Centreline: 1 m resampling from 40 m behind the ego's projection.
    cl_states = np.asarray([[s.x, s.y, s.heading] for s in cache.centerline.discrete_path])
    cl = _pose_to_ego(cl_states, origin)
    cum = world._arclength(cl)
    s_ego = world._Route._project_xy(cl, cum, np.zeros((1, 2)))[0][0]
    s = np.arange(max(s_ego - 40.0, 0.0), cum[-1] + 1e-9, 1.0)[: world.CENTERLINE_LEN]
    pts = world._interp_path(cl, s, cum)
    centerline = np.repeat(pts[-1:], world.CENTERLINE_LEN, 0)
    centerline[: len(pts)] = pts
    cl_mask = np.zeros(world.CENTERLINE_LEN, bool)
    cl_mask[: len(pts)] = True
    hist10 = np.zeros((world.NUM_HIST10, 5))
    scene = world.Scene(
        history=history, status=status, expert=expert, ref_poses=ref, hist10=hist10, obj_boxes=boxes,
        obj_valid=valid, obj_type=otype, obj_speed=ospeed, drivable=drivable, drivable_mask=drivable_mask,
        lanes=lane_arr, lane_mask=lane_mask, lane_on_route=on_route, intersections=inter,
        intersection_mask=inter_mask, centerline=centerline, centerline_mask=cl_mask, command=np.array(3),
        kind=np.array(0), domain=np.array(0), seed=np.array(0))
    return world._cast(scene), notes


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
    scenes, tokens, dropped = [], [], {}
    from recogdrive_jax.train.metrics import track
    for p in track(paths, desc="convert navsim-metric-cache", unit="scenes"):
        try:
            sc, notes = convert_cache_file(p)
        except Exception as e:  # name the file; keep the original error
            raise SystemExit(f"{p}: conversion failed: {type(e).__name__}: {e}") from e
        scenes.append(sc)
        tokens.append(os.path.basename(os.path.dirname(p)))  # NAVSIM's MetricCacheLoader: token = parent folder
        for k, v in notes.items():
            dropped[k] = dropped.get(k, 0) + v
    scene_store.save_scenes(args.out, scenes, extra={"tokens": np.array(tokens, dtype=str)})
    print(f"wrote {len(scenes)} scenes to {args.out}; truncated to the padded caps: {dropped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
