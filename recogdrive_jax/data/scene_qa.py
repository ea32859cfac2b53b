"""Driving QA generated from synthetic scenes, written in the real InternVL chat format.

`write_qa_dataset(out_dir, num_scenes, seed)` renders each scene's front camera (and BEV for the two-image
prediction rows), writes one JSONL per task and a meta JSON `{name: {"root", "annotation", "repeat_time",
"length"}}` (upstream `recogdrive_pretrain.json` layout). Rows: `{"id", "image": path | [paths],
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}` with image
paths relative to `root`.

Tasks: perception (objects, counts, distances), prediction (other agents' motion), planning (meta-actions),
cognitive (seed 000's 4-stage answer: perception -> understanding -> reasoning -> decision) and trajectory QA
(`data/driving_prompt.py` question with the ego-status line, as upstream's Stage-1 planning QA; `"[PT, (x, y, h),
...]"` answer).
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

from recogdrive_jax.data import driving_prompt
from recogdrive_jax.sim import render, world
from recogdrive_jax.sim.world import Scene

DEFAULT_REPEAT = {"perception": 1.0, "prediction": 1.0, "planning": 1.0, "cognitive": 1.0, "trajectory": 2.0}


def _objects(scene: Scene) -> list[dict]:
    out = []
    for a in range(world.MAX_OBJECTS):
        t = int(scene.obj_type[a])
        if t == 0 or not scene.obj_valid[0, a]:
            continue
        x, y, h = (float(v) for v in scene.obj_boxes[0, a, :3])
        side = "ahead" if abs(y) < 2.0 else ("on the left" if y > 0 else "on the right")
        if x < -2.0:
            side = "behind" if abs(y) < 2.0 else side + " behind"
        oncoming = abs(float(world.wrap_angle(h))) > np.pi / 2
        out.append(dict(idx=a, type=world.OBJ_TYPE_NAMES[t], x=x, y=y, heading=h, speed=float(scene.obj_speed[a]),
                        dist=float(np.hypot(x, y)), side=side, oncoming=oncoming))
    return sorted(out, key=lambda o: o["dist"])


def _in_lane_ahead(objs):
    return [o for o in objs if o["x"] > 0 and abs(o["y"]) < 2.0]


def meta_action(scene: Scene) -> tuple[str, str]:
    """(speed action, path action) of the expert: ACCELERATE / KEEP SPEED / DECELERATE / STOP and
    GO STRAIGHT / TURN LEFT / TURN RIGHT / CHANGE LANE LEFT / CHANGE LANE RIGHT."""
    v0 = float(scene.status[4])
    expert = np.asarray(scene.expert, np.float64)  # not ref_poses: that may hold PDM-Closed, not the expert
    v_end = float(np.hypot(*(expert[-1, :2] - expert[-2, :2]))) / 0.5
    if v_end < 0.3:
        speed = "STOP"
    elif v_end > v0 + 1.0:
        speed = "ACCELERATE"
    elif v_end < v0 - 1.0:
        speed = "DECELERATE"
    else:
        speed = "KEEP SPEED"
    dh = float(scene.expert[-1, 2])
    if dh > 0.5:
        path = "TURN LEFT"
    elif dh < -0.5:
        path = "TURN RIGHT"
    else:
        path = "GO STRAIGHT"
    return speed, path


def _perception_rows(scene, objs):
    near = [o for o in objs if o["dist"] < 60.0]
    listing = "; ".join(f"a {o['type']} {o['side']} at {o['dist']:.1f} m" for o in near[:8]) or "no objects"
    counts = {}
    for o in near:
        counts[o["type"]] = counts.get(o["type"], 0) + 1
    count_txt = ", ".join(f"{n} {t}{'s' if n > 1 else ''}" for t, n in sorted(counts.items())) or "nothing"
    lead = _in_lane_ahead(objs)
    lead_txt = (f"The nearest object in the ego lane is a {lead[0]['type']} {lead[0]['x']:.1f} m ahead."
                if lead else "There is no object ahead in the ego lane.")
    return [
        ("Describe the important objects around the ego vehicle and where they are.", f"There is {listing}."),
        ("How many objects of each type are within 60 meters?", f"Within 60 meters there are {count_txt}."),
        ("What is the distance to the nearest object ahead in the ego lane?", lead_txt),
    ]


def _prediction_rows(scene, objs):
    movers = [o for o in objs if o["type"] == "car" and o["dist"] < 50.0]
    if not movers:
        return [("Which vehicles around the ego vehicle are moving, and where will they be in 3 seconds?",
                 "No moving vehicles are close to the ego vehicle.")]
    rows = []
    for o in movers[:2]:
        fut = scene.obj_boxes[30, o["idx"]]
        state = "stationary" if o["speed"] < 0.3 else f"moving at {o['speed']:.1f} m/s" + (
            ", in the oncoming direction" if o["oncoming"] else ", in the ego direction")
        rows.append((f"Predict the motion of the car {o['side']} at ({o['x']:.1f}, {o['y']:.1f}).",
                     f"The car is {state}; in 3 seconds it will be at ({fut[0]:.1f}, {fut[1]:.1f})."))
    return rows


def _planning_rows(scene, objs):
    speed, path = meta_action(scene)
    cmd = driving_prompt.command_text(int(scene.command))
    return [(f"The navigation command is {cmd}. What meta-action should the ego vehicle take?",
             f"Speed: {speed}. Path: {path}.")]


def _cognitive_answer(scene, objs):
    st = world.ego_state_summary(scene)
    speed, path = meta_action(scene)
    kind = world.SCENE_KINDS[int(scene.kind)]
    lead = _in_lane_ahead(objs)
    near = [o for o in objs if o["dist"] < 40.0]
    perception = (f"Perception: the ego vehicle drives at {st['speed']:.1f} m/s on a {kind} road"
                  f"{' approaching a junction' if kind == 'junction' else ''}; "
                  f"{len(near)} objects are within 40 m" + (f", the closest a {near[0]['type']} {near[0]['side']} "
                                                           f"at {near[0]['dist']:.1f} m." if near else "."))
    if lead:
        understanding = (f"Understanding: a {lead[0]['type']} occupies the ego lane {lead[0]['x']:.1f} m ahead "
                         f"at {lead[0]['speed']:.1f} m/s.")
    else:
        understanding = "Understanding: the ego lane ahead is clear."
    reasoning = (f"Reasoning: to follow the command {driving_prompt.command_text(int(scene.command))} safely the "
                 + ("ego must keep a safe gap to the lead object" if lead else "ego can follow the lane") +
                 (" and slow down for the turn." if path != "GO STRAIGHT" else "."))
    decision = f"Decision: {speed}, {path}. Trajectory: {driving_prompt.trajectory_answer(scene.expert)}"
    return "\n".join([perception, understanding, reasoning, decision])


def _row(rid, image, question, answer):
    images = image if isinstance(image, list) else [image]
    prefix = "".join("<image>\n" for _ in images)
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": prefix + question},
                                                          {"from": "gpt", "value": answer}]}


def qa_rows_for_scene(scene: Scene, sid: str, front: str, bev: str) -> dict[str, list[dict]]:
    """Rows per task for one scene; `front` / `bev` are image paths relative to the dataset root."""
    objs = _objects(scene)
    rows = {k: [] for k in DEFAULT_REPEAT}
    for i, (q, a) in enumerate(_perception_rows(scene, objs)):
        rows["perception"].append(_row(f"{sid}_per{i}", front, q, a))
    for i, (q, a) in enumerate(_prediction_rows(scene, objs)):
        rows["prediction"].append(_row(f"{sid}_pre{i}", [front, bev], "The second image is a bird's-eye view. " + q, a))
    for i, (q, a) in enumerate(_planning_rows(scene, objs)):
        rows["planning"].append(_row(f"{sid}_pla{i}", front, q, a))
    q = ("Analyse the driving scene step by step (perception, understanding, reasoning, decision) and plan the "
         "ego vehicle's next 4 seconds.")
    rows["cognitive"].append(_row(f"{sid}_cog", front, q, _cognitive_answer(scene, objs)))
    # upstream's Stage-1 planning QA: front camera + history + ego status + command -> the future waypoints as text
    # (the same question the `cache` stage asks, so the states it caches answer what SFT taught)
    tq = driving_prompt.driving_question(scene.history, int(scene.command), status=scene.status)
    tq = tq[len("<image>\n"):] if tq.startswith("<image>\n") else tq
    rows["trajectory"].append(_row(f"{sid}_traj", front, tq, driving_prompt.trajectory_answer(scene.expert)))
    return rows


def write_qa_dataset(out_dir: str, num_scenes: int, seed: int = 0, *, image_size: tuple[int, int] = (256, 448),
                     repeat_time: dict[str, float] | None = None, bev_size: int = 224, domain: str | None = None,
                     scenes: Iterable[Scene] | None = None, prefix: str = "synthetic") -> str:
    """Generates scenes (or uses `scenes`), renders images, writes JSONL per task and the meta JSON.

    Returns the meta JSON path. `image_size` is (height, width) of the front camera; `repeat_time` overrides
    DEFAULT_REPEAT per task; `domain` forces a visual domain (e.g. 'fog' for an OOD split)."""
    repeat = dict(DEFAULT_REPEAT, **(repeat_time or {}))
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    from recogdrive_jax.train.metrics import track
    if scenes is None:
        scenes = (world.generate_scene(seed * 1_000_003 + i, domain=domain, reference="expert") for i in range(num_scenes))
    scenes = track(scenes, total=len(scenes) if hasattr(scenes, "__len__") else num_scenes, desc="qa scenes",
                   unit="scenes")
    files = {k: open(os.path.join(out_dir, "annotations", f"{prefix}_{k}.jsonl"), "w") for k in repeat}
    counts = {k: 0 for k in repeat}
    try:
        for i, sc in enumerate(scenes):
            sid = f"{prefix}_{seed}_{i:06d}"
            front = f"images/{sid}_front.png"
            bev = f"images/{sid}_bev.png"
            render.save_png(render.render_front(sc, *image_size), os.path.join(out_dir, front))
            render.render_bev(sc, size=bev_size, path=os.path.join(out_dir, bev))
            for k, rows in qa_rows_for_scene(sc, sid, front, bev).items():
                for r in rows:
                    files[k].write(json.dumps(r) + "\n")
                counts[k] += len(rows)
    finally:
        for f in files.values():
            f.close()
    meta = {f"{prefix}_{k}": {"root": os.path.abspath(out_dir),
                              "annotation": os.path.abspath(os.path.join(out_dir, "annotations", f"{prefix}_{k}.jsonl")),
                              "repeat_time": repeat[k], "length": counts[k]} for k in repeat}
    meta_path = os.path.join(out_dir, f"{prefix}_meta.json")
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    return meta_path
