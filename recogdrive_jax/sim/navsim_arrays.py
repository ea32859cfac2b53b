"""A `Scene` as the array scene that the navsim-real tool scores, and back.

`../shared/tools/navsim-real/navsim_real_pdm.py` runs the unmodified NAVSIM v1.1 scorer on scenes given as plain
arrays (its module docstring defines the format). Writing a project scene in that format, and reading the same file
back into a `Scene`, lets the real scorer and `sim/pdm.py` score identical numbers: every value is the scene's
float32 value (the tool casts to float64 itself), polygons lose only their padding, and the round trip is exact.

Mapping (ego frame throughout, so the tool's "global" frame is the ego frame):
- ego_state = (0, 0, 0, vx, vy, ax, ay) from `status[4:8]`;
- agents [51, M, 8] = the M real objects' boxes, velocity = `obj_speed` along the box heading (the scorer reads it
  only at an object's first appearance, as "stopped" when <= 0.05 m/s), valid; agent_types: car / parked car ->
  nuPlan VEHICLE (0), cone -> TRAFFIC_CONE (3), barrier -> BARRIER (4);
- drivable / lane (+ lane_on_route) / intersection polygons, unpadded; centerline = the masked (x, y, heading) rows;
- pdm_closed_trajectory = `ref_poses` (EP's reference), when `reference_poses` is not given otherwise.
Keys prefixed `project_` carry what the scorer does not read (history, command, ...) for the exact round trip; the
tool ignores them.
"""
from __future__ import annotations

import numpy as np

from recogdrive_jax.sim import world
from recogdrive_jax.sim.world import Scene

NUPLAN_VEHICLE, NUPLAN_TRAFFIC_CONE, NUPLAN_BARRIER = 0, 3, 4
_TO_NUPLAN = {world.OBJ_VEHICLE: NUPLAN_VEHICLE, world.OBJ_PARKED: NUPLAN_VEHICLE,
              world.OBJ_CONE: NUPLAN_TRAFFIC_CONE, world.OBJ_BARRIER: NUPLAN_BARRIER}
_POLYGONS = (("drivable", "drivable", "drivable_mask", world.MAX_DRIVABLE),
             ("lane", "lanes", "lane_mask", world.MAX_LANES),
             ("intersection", "intersections", "intersection_mask", world.MAX_INTERSECTIONS))
_PROJECT_FIELDS = ("history", "status", "expert", "hist10", "obj_type", "command", "kind", "domain", "seed")


def _unpad(poly: np.ndarray) -> np.ndarray:
    """Drop the padding (trailing repeats of vertex 0, world._pad_poly) of one [V, 2] polygon."""
    same = np.all(poly == poly[:1], -1)
    n = len(poly)
    while n > 1 and same[n - 1]:
        n -= 1
    return poly[:n]


def scene_to_arrays(scene: Scene, trajectories: np.ndarray | None = None,
                    reference_poses: np.ndarray | None = None, with_reference: bool = True,
                    speed_limit: float | None = None) -> dict[str, np.ndarray]:
    """One unbatched scene (+ candidates [N, 8, 3]) -> the navsim-real npz fields (dtype float32 / int64 / bool).

    with_reference=False leaves out `pdm_closed_trajectory`, so the tool runs the real PDM-Closed (whose IDM
    targets fractions of `speed_limit`, m/s; NAVSIM falls back to 15 m/s without one)."""
    st = np.asarray(scene.status, np.float32)
    real = np.nonzero(np.asarray(scene.obj_type) > 0)[0]
    boxes = np.asarray(scene.obj_boxes, np.float32)[:, real]  # [F, M, 5]
    speed = np.asarray(scene.obj_speed, np.float32)[real]
    vx, vy = speed * np.cos(boxes[..., 2]), speed * np.sin(boxes[..., 2])  # [F, M]
    valid = np.asarray(scene.obj_valid)[:, real].astype(np.float32)
    out = {
        "ego_state": np.concatenate([np.zeros(3, np.float32), st[4:8]]),
        "agents": np.concatenate([boxes, vx[..., None], vy[..., None], valid[..., None]], -1).astype(np.float32),
        "agent_types": np.array([_TO_NUPLAN[int(t)] for t in np.asarray(scene.obj_type)[real]], np.int64),
        "centerline": np.asarray(scene.centerline, np.float32)[np.asarray(scene.centerline_mask)],
        "project_obj_index": real.astype(np.int64),
    }
    if with_reference:
        out["pdm_closed_trajectory"] = np.asarray(scene.ref_poses if reference_poses is None else reference_poses,
                                                  np.float32)
    if speed_limit is not None:
        out["speed_limit"] = np.asarray(speed_limit, np.float64)
    for name, field, mask_field, _ in _POLYGONS:
        mask = np.asarray(getattr(scene, mask_field))
        polys = [_unpad(np.asarray(p, np.float32)) for p in np.asarray(getattr(scene, field))[mask]]
        if polys:
            out[f"{name}_xy"] = np.concatenate(polys)
            out[f"{name}_sizes"] = np.array([len(p) for p in polys], np.int64)
    out["lane_on_route"] = np.asarray(scene.lane_on_route)[np.asarray(scene.lane_mask)]
    for f in _PROJECT_FIELDS:
        out[f"project_{f}"] = np.asarray(getattr(scene, f))
    if not with_reference:  # the synthetic expert reference still round-trips
        out["project_ref_poses"] = np.asarray(scene.ref_poses)
    if trajectories is not None:
        out["trajectories"] = np.asarray(trajectories, np.float32)
    return out


def _polys(arrays, name: str, cap: int) -> tuple[np.ndarray, np.ndarray]:
    arr = np.zeros((cap, world.POLY_VERTS, 2), np.float32)
    mask = np.zeros(cap, bool)
    if f"{name}_xy" in arrays:
        sizes = np.asarray(arrays[f"{name}_sizes"])
        for i, p in enumerate(np.split(np.asarray(arrays[f"{name}_xy"], np.float32), np.cumsum(sizes)[:-1])):
            arr[i] = world._pad_poly(p)
            mask[i] = True
    return arr, mask


def arrays_to_scene(arrays) -> Scene:
    """Inverse of `scene_to_arrays` (the scorer-relevant fields come from the navsim-real fields themselves)."""
    agents = np.asarray(arrays["agents"], np.float32)  # [F, M, 8]
    idx = np.asarray(arrays["project_obj_index"])
    boxes = np.zeros((world.NUM_FRAMES, world.MAX_OBJECTS, 5), np.float32)
    valid = np.zeros((world.NUM_FRAMES, world.MAX_OBJECTS), bool)
    speed = np.zeros(world.MAX_OBJECTS, np.float32)
    boxes[:, idx] = agents[..., :5]
    valid[:, idx] = agents[..., 7] > 0.5
    speed[idx] = np.hypot(agents[0, :, 5].astype(np.float64), agents[0, :, 6].astype(np.float64))
    status = np.asarray(arrays["project_status"], np.float32).copy()
    status[4:8] = np.asarray(arrays["ego_state"], np.float32)[3:7]
    cl = np.asarray(arrays["centerline"], np.float32)
    centerline = np.repeat(cl[-1:], world.CENTERLINE_LEN, 0)
    centerline[: len(cl)] = cl
    cl_mask = np.arange(world.CENTERLINE_LEN) < len(cl)
    fields = {f: np.asarray(arrays[f"project_{f}"]) for f in _PROJECT_FIELDS}
    ref = arrays["pdm_closed_trajectory"] if "pdm_closed_trajectory" in arrays else arrays["project_ref_poses"]
    fields.update(status=status, ref_poses=np.asarray(ref, np.float32)[:world.NUM_SIM_STATES],
                  obj_boxes=boxes, obj_valid=valid, obj_speed=speed, centerline=centerline, centerline_mask=cl_mask)
    for name, field, mask_field, cap in _POLYGONS:
        fields[field], fields[mask_field] = _polys(arrays, name, cap)
    on_route = np.zeros(world.MAX_LANES, bool)
    on_route[: len(arrays["lane_on_route"])] = np.asarray(arrays["lane_on_route"], bool)
    fields["lane_on_route"] = on_route
    return world._cast(Scene(**fields))


def save(path: str, arrays: dict[str, np.ndarray]) -> None:
    np.savez_compressed(path, **arrays)


def load(path: str) -> dict[str, np.ndarray]:
    """Plain arrays only (allow_pickle=False)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
