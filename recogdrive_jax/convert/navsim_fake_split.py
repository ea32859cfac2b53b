"""A tiny fake NAVSIM split from the synthetic world, in NAVSIM's on-disk layout, so the real data path
(`convert navsim-logs` -> cache -> il -> rl -> eval -> NAVSIM CSV) runs in CI without NAVSIM data.

    python -m recogdrive_jax.convert.navsim_fake_split OUT [--logs 2 --scenes_per_log 3 --splits train,eval,test]

Writes, per split (NAVSIM's folder names in brackets):
  OUT/navsim_logs/<split>/<log>.pkl      [navsim_logs/<split>/]  a list of plain frame dicts, as NAVSIM v1.1's
                                         `SceneLoader` / `Scene.from_scene_dict_list` read them
  OUT/sensor_blobs/<split>/<log>/CAM_F0/<token>.jpg              the current frame's front-camera JPEG
  OUT/metric_cache/<split>.npz           what `convert navsim-metric-cache` would write for these samples (scene
                                         store + `tokens`): the synthetic scenes themselves

Each synthetic scene becomes one NAVSIM scene of 4 history + 10 future frames at 0.5 s (the expert's 8 poses, then 2
constant-velocity poses), placed at a random global pose; a log holds `scenes_per_log` such chunks back to back,
so NAVSIM's default `SceneFilter` (4 + 10 frames, frame_interval 14) cuts exactly these samples. The current frame
carries the scene's exact velocity/acceleration and command; other frames get finite-difference dynamics. Only the
current frame's CAM_F0 image is written (the converter and the cache read no other); the log pickles themselves are
written with `pickle` (writing is safe; only the explicit conversion commands read pickles), holding plain Python
lists/numbers only, so that NAVSIM's older numpy (1.x) can read them (numpy 2 pickles arrays as `numpy._core`).
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys

import numpy as np

from recogdrive_jax.convert.navsim_logs import yaw_quaternion
from recogdrive_jax.sim import scene_store, world

NUM_HISTORY_FRAMES, NUM_FUTURE_FRAMES = 4, 10
CAMERAS = ("CAM_F0", "CAM_L0", "CAM_L1", "CAM_L2", "CAM_R0", "CAM_R1", "CAM_R2", "CAM_B0")
MAP_LOCATION = "us-nv-las-vegas-strip"


def _to_global(origin: np.ndarray, local: np.ndarray) -> np.ndarray:
    c, s = np.cos(origin[2]), np.sin(origin[2])
    x = origin[0] + c * local[:, 0] - s * local[:, 1]
    y = origin[1] + s * local[:, 0] + c * local[:, 1]
    return np.stack([x, y, world.wrap_angle(origin[2] + local[:, 2])], -1)


def scene_frames(scene: world.Scene, log_name: str, scene_idx: int, origin: np.ndarray, t0_us: int) -> list:
    """One synthetic scene -> 14 NAVSIM frame dicts (4 history incl. current, 10 future)."""
    hist = np.asarray(scene.history, np.float64)  # [4, 3] at -1.5..0 s
    fut = np.asarray(scene.expert, np.float64)  # [8, 3] at 0.5..4 s
    step = fut[-1] - fut[-2]
    extra = np.stack([fut[-1] + step * (k + 1) for k in range(NUM_FUTURE_FRAMES - len(fut))])
    local = np.concatenate([hist, fut, extra])  # [14, 3] in the current ego frame
    poses = _to_global(origin, local)
    cur = NUM_HISTORY_FRAMES - 1
    status = np.asarray(scene.status, np.float64)
    cmd = np.zeros(4, np.int64)
    cmd[int(np.asarray(scene.command))] = 1
    frames = []
    for i, pose in enumerate(poses):
        token = f"{log_name}{scene_idx:03d}{i:02d}"
        if i == cur:
            dyn = status[4:8].tolist()
        else:  # finite differences in the frame's own ego frame
            j = min(max(i, 1), len(poses) - 1)
            d = poses[j, :2] - poses[j - 1, :2]
            c, s = np.cos(pose[2]), np.sin(pose[2])
            v = np.array([c * d[0] + s * d[1], -s * d[0] + c * d[1]]) / world.PLAN_DT
            dyn = [float(v[0]), float(v[1]), 0.0, 0.0]
        cams = {name: {"data_path": f"{log_name}/{name}/{token}.jpg",
                       "sensor2lidar_rotation": np.eye(3).tolist(), "sensor2lidar_translation": [0.0] * 3,
                       "cam_intrinsic": np.eye(3).tolist(), "distortion": [0.0] * 5} for name in CAMERAS}
        frames.append({
            "token": token, "timestamp": int(t0_us + i * 500_000), "log_name": log_name,
            "scene_token": f"{log_name}{scene_idx:03d}", "map_location": MAP_LOCATION,
            "roadblock_ids": ["roadblock_0"], "traffic_lights": [],
            "ego2global_translation": [float(pose[0]), float(pose[1]), 0.0],
            "ego2global_rotation": [float(x) for x in yaw_quaternion(pose[2])],
            "ego_dynamic_state": [float(x) for x in dyn], "driving_command": [int(x) for x in cmd],
            "cams": cams, "lidar_path": f"{log_name}/MergedPointCloud/{token}.pcd",
            "anns": {"gt_boxes": [], "gt_names": [], "gt_velocity_3d": [],
                     "instance_tokens": [], "track_tokens": []},
        })
    return frames


def write_split(out: str, split: str, scenes: list, num_logs: int, seed: int) -> list[str]:
    """Writes one split; returns the sample tokens in log/scene order."""
    from PIL import Image

    from recogdrive_jax.sim import render
    rng = np.random.default_rng(seed)
    log_dir = os.path.join(out, "navsim_logs", split)
    blob_dir = os.path.join(out, "sensor_blobs", split)
    os.makedirs(log_dir, exist_ok=True)
    per_log = -(-len(scenes) // num_logs)
    tokens = []
    for li in range(num_logs):
        log_name = f"fake{split}{li:02d}"
        frames = []
        for k, scene in enumerate(scenes[li * per_log:(li + 1) * per_log]):
            origin = np.array([rng.uniform(-500, 500), rng.uniform(-500, 500), rng.uniform(-np.pi, np.pi)])
            chunk = scene_frames(scene, log_name, k, origin, t0_us=10**15 + k * 10**8)
            cur = chunk[NUM_HISTORY_FRAMES - 1]
            path = os.path.join(blob_dir, cur["cams"]["CAM_F0"]["data_path"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(np.asarray(render.render_front(scene))).save(path, quality=95)
            tokens.append(cur["token"])
            frames += chunk
        with open(os.path.join(log_dir, f"{log_name}.pkl"), "wb") as f:
            pickle.dump(frames, f)
    return tokens


def write_fake_split(out: str, splits=("train", "eval", "test"), num_logs: int = 2, scenes_per_log: int = 3,
                     seed: int = 0, reference: str = world.DEFAULT_REFERENCE) -> dict[str, list[str]]:
    """The whole fake dataset under `out`; returns {split: tokens}. `reference`: the scenes' EP reference (PDM-Closed
    by default, as in NAVSIM's metric cache)."""
    result = {}
    os.makedirs(os.path.join(out, "metric_cache"), exist_ok=True)
    for si, split in enumerate(splits):
        scenes = world.generate_scenes(num_logs * scenes_per_log, seed=seed + 7919 * (si + 1), reference=reference)
        tokens = write_split(out, split, scenes, num_logs, seed + si)
        scene_store.save_scenes(os.path.join(out, "metric_cache", f"{split}.npz"), scenes,
                                extra={"tokens": np.array(tokens, dtype=str)})
        result[split] = tokens
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recogdrive_jax.convert.navsim_fake_split", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--splits", default="train,eval,test")
    ap.add_argument("--logs", type=int, default=2)
    ap.add_argument("--scenes_per_log", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    res = write_fake_split(args.out, [s for s in args.splits.split(",") if s], args.logs, args.scenes_per_log,
                           args.seed)
    print(f"wrote a fake NAVSIM split to {args.out}: " + ", ".join(f"{k} {len(v)} samples" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
