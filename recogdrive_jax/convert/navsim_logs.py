"""Convert NAVSIM/OpenScene logs (log pickles + sensor blobs) into the project's pickle-free sample format.

    python -m recogdrive_jax.convert navsim-logs LOGS_DIR SENSOR_BLOBS_DIR OUT_DIR \
        [--metric_cache CONVERTED.npz] [--num_history_frames 4 --num_future_frames 10 --frame_interval N]
    # or, inside a NAVSIM environment without this package's dependencies:
    python path/to/recogdrive_jax/convert/navsim_logs.py LOGS_DIR SENSOR_BLOBS_DIR OUT_DIR

Runs inside a user's NAVSIM environment (old numpy/Python): numpy only at module level, no jax, no other module of
this package (a test imports it with `jax` blocked). Unpickles the log files, so run it only on logs you trust (this
explicit command is one of the two places in the project that unpickles anything).

Which samples: exactly NAVSIM v1.1's `filter_scenes` (navsim/common/dataloader.py): each log's frame list is cut
into chunks of `num_history_frames + num_future_frames` frames every `frame_interval` frames (default: the chunk
length), short chunks and (by default) chunks whose current frame has no `roadblock_ids` are dropped, and a
sample's token is its current frame's (index num_history_frames - 1). Per sample (`OUT_DIR/samples.npz`):

  tokens, log_names   [N] str
  history             [N, 4, 3] float32  ego poses (x, y, heading) of the 4 last frames in the current ego frame
                      (NAVSIM `AgentInput.ego_statuses[i].ego_pose`)
  future              [N, 8, 3] float32  the next 8 poses at 0.5 s in the current ego frame
                      (NAVSIM `Scene.get_future_trajectory(8).poses`)
  status              [N, 8] float32     driving-command one-hot (4) + velocity (2) + acceleration (2) of the
                      current frame (ReCogDrive's `status_feature`)
  command             [N] int32          argmax of the one-hot (0 left, 1 straight, 2 right, 3 unknown)
  camera_front        [N] str            absolute path of the current frame's CAM_F0 JPEG

Poses follow NAVSIM: global (x, y) = `ego2global_translation[:2]`, heading = pyquaternion's yaw of
`ego2global_rotation` (w, x, y, z), global -> local as `convert_absolute_to_relative_se2_array`.

PDM inputs (maps, objects, PDM-Closed reference) are not in the logs: NAVSIM scores with its metric cache.
`--metric_cache` takes the output of `convert navsim-metric-cache` (a scene store .npz with a `tokens` field) and
writes the scenes of this split's tokens, in sample order, to `OUT_DIR/pdm_scenes.npz` (tokens without a cached
scene are reported and left out of that file; the `rl`/`eval` stages then score only the tokens that have one,
as NAVSIM's run_pdm_score.py does).
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys

import numpy as np

FORMAT_VERSION = 1
NUM_HISTORY = 4  # the 4 poses ReCogDrive conditions on (last 4 frames at 2 Hz)
NUM_FUTURE_POSES = 8  # 4 s at 0.5 s
FRONT_CAMERA = "CAM_F0"
SAMPLE_FIELDS = ("tokens", "log_names", "history", "future", "status", "command", "camera_front")


class NavsimLogError(ValueError):
    """A log file or frame is not in NAVSIM's format (the message names the file, frame and key)."""


def quaternion_yaw(q) -> float:
    """pyquaternion's `Quaternion(*q).yaw_pitch_roll[0]` for q = (w, x, y, z) (normalised first, as it does)."""
    q = np.asarray(q, np.float64)
    q = q / np.sqrt(np.sum(q * q))
    return float(np.arctan2(2 * (q[0] * q[3] - q[1] * q[2]), 1 - 2 * (q[2] ** 2 + q[3] ** 2)))


def yaw_quaternion(yaw: float) -> np.ndarray:
    """(w, x, y, z) of a rotation by `yaw` about z (the writer's inverse of `quaternion_yaw`)."""
    return np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])


def absolute_to_relative(origin: np.ndarray, poses: np.ndarray) -> np.ndarray:
    """NAVSIM's `convert_absolute_to_relative_se2_array`: poses [T, 3] global -> the frame of `origin` [3]."""
    theta = -origin[2]
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    rel = np.asarray(poses, np.float64) - np.asarray(origin, np.float64)[None]
    rel[..., :2] = rel[..., :2] @ rot.T
    rel[:, 2] = np.arctan2(np.sin(rel[:, 2]), np.cos(rel[:, 2]))
    return rel


def _get(frame: dict, key: str, where: str):
    if key not in frame:
        raise NavsimLogError(f"{where}: missing key {key!r} (not a NAVSIM/OpenScene log frame)")
    return frame[key]


def global_pose(frame: dict, where: str) -> np.ndarray:
    t = np.asarray(_get(frame, "ego2global_translation", where), np.float64)
    q = np.asarray(_get(frame, "ego2global_rotation", where), np.float64)
    if t.shape[0] < 2 or q.shape != (4,):
        raise NavsimLogError(f"{where}: ego2global_translation {t.shape} / ego2global_rotation {q.shape}, "
                             "expected (3,) / (4,)")
    return np.array([t[0], t[1], quaternion_yaw(q)], np.float64)


def scene_chunks(frames: list, num_history_frames: int, num_future_frames: int, frame_interval: int | None,
                 has_route: bool = True) -> list:
    """NAVSIM v1.1 `filter_scenes` for one log: the frame chunks that become samples."""
    num_frames = num_history_frames + num_future_frames
    step = frame_interval or num_frames
    out = []
    for i in range(0, len(frames), step):
        chunk = frames[i:i + num_frames]
        if len(chunk) < num_frames:
            continue
        if has_route and len(chunk[num_history_frames - 1].get("roadblock_ids", [])) == 0:
            continue
        out.append(chunk)
    return out


def convert_chunk(chunk: list, num_history_frames: int, sensor_blobs: str, where: str) -> dict:
    """One NAVSIM scene (frame chunk) -> one sample (see the module docstring)."""
    if num_history_frames < NUM_HISTORY:
        raise NavsimLogError(f"num_history_frames={num_history_frames}: the planner needs {NUM_HISTORY}")
    if len(chunk) < num_history_frames + NUM_FUTURE_POSES:
        raise NavsimLogError(f"{where}: {len(chunk)} frames, the 8-pose future needs num_future_frames >= 8")
    cur = num_history_frames - 1
    poses = np.stack([global_pose(f, f"{where} frame {i}") for i, f in enumerate(chunk)])  # [F, 3]
    hist = absolute_to_relative(poses[cur], poses[cur - NUM_HISTORY + 1: cur + 1])
    fut = absolute_to_relative(poses[cur], poses[cur + 1: cur + 1 + NUM_FUTURE_POSES])
    frame = chunk[cur]
    w = f"{where} frame {cur}"
    dyn = np.asarray(_get(frame, "ego_dynamic_state", w), np.float64)
    cmd = np.asarray(_get(frame, "driving_command", w), np.float64)
    if dyn.shape[0] < 4 or cmd.shape != (4,):
        raise NavsimLogError(f"{w}: ego_dynamic_state {dyn.shape} / driving_command {cmd.shape}, expected (4,) / (4,)")
    cams = _get(frame, "cams", w)
    if FRONT_CAMERA not in cams or "data_path" not in cams[FRONT_CAMERA]:
        raise NavsimLogError(f"{w}: cams has no {FRONT_CAMERA}.data_path")
    image = os.path.abspath(os.path.join(sensor_blobs, str(cams[FRONT_CAMERA]["data_path"])))
    status = np.concatenate([cmd, dyn[:2].astype(np.float32), dyn[2:4].astype(np.float32)])
    return {"tokens": str(_get(frame, "token", w)), "log_names": str(_get(frame, "log_name", w)),
            "history": hist.astype(np.float32), "future": fut.astype(np.float32),
            "status": status.astype(np.float32), "command": int(np.argmax(cmd)) if cmd.any() else 3,
            "camera_front": image}


def load_log(path: str) -> list:
    """A log pickle: a list of frame dicts. Explicit conversion command only (see the module docstring)."""
    with open(path, "rb") as f:
        frames = pickle.load(f)
    if not isinstance(frames, list) or not all(isinstance(x, dict) for x in frames):
        raise NavsimLogError(f"{path}: expected a list of frame dicts, got {type(frames).__name__}")
    return frames


def convert_logs(logs_dir: str, sensor_blobs: str, num_history_frames: int = 4, num_future_frames: int = 10,
                 frame_interval: int | None = None, has_route: bool = True, log_names=None,
                 check_images: bool = True) -> dict:
    """All logs under `logs_dir` (*.pkl, sorted by name) -> the stacked sample arrays."""
    if not os.path.isdir(logs_dir):
        raise NavsimLogError(f"{logs_dir}: not a directory (expected NAVSIM's navsim_logs/<split>/)")
    files = sorted(f for f in os.listdir(logs_dir) if f.endswith(".pkl"))
    if log_names:
        files = [f for f in files if f[:-4] in set(log_names)]
    if not files:
        raise NavsimLogError(f"{logs_dir}: no *.pkl log files")
    rows = []
    for name in files:
        path = os.path.join(logs_dir, name)
        frames = load_log(path)
        for chunk in scene_chunks(frames, num_history_frames, num_future_frames, frame_interval, has_route):
            row = convert_chunk(chunk, num_history_frames, sensor_blobs, f"{path}")
            if check_images and not os.path.isfile(row["camera_front"]):
                raise NavsimLogError(f"{path}: token {row['tokens']}: front camera image {row['camera_front']} "
                                     "does not exist (wrong SENSOR_BLOBS_DIR?)")
            rows.append(row)
    if not rows:
        raise NavsimLogError(f"{logs_dir}: no sample has {num_history_frames}+{num_future_frames} frames with a route")
    out = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in SAMPLE_FIELDS}
    out["command"] = out["command"].astype(np.int32)
    if len(set(out["tokens"].tolist())) != len(rows):
        raise NavsimLogError(f"{logs_dir}: duplicate sample tokens")
    return out


def save_samples(path: str, samples: dict) -> str:
    tmp = path + ".tmp.npz"
    np.savez(tmp, __format_version__=np.array(FORMAT_VERSION), **{k: samples[k] for k in SAMPLE_FIELDS})
    os.replace(tmp, path)
    return path


def select_metric_cache(cache_npz: str, tokens: np.ndarray) -> tuple[dict, np.ndarray]:
    """The converted metric cache's scenes of `tokens`, in that order: (arrays, found mask [N])."""
    with np.load(cache_npz, allow_pickle=False) as data:
        if "tokens" not in data.files:
            raise NavsimLogError(f"{cache_npz}: no 'tokens' field (write it with `convert navsim-metric-cache`)")
        arrays = {k: data[k] for k in data.files}
    where = {str(t): i for i, t in enumerate(arrays["tokens"].tolist())}
    found = np.array([str(t) in where for t in tokens.tolist()])
    idx = np.array([where[str(t)] for t in tokens.tolist() if str(t) in where], np.int64)
    n = len(arrays["tokens"])
    out = {k: (v[idx] if (v.ndim and v.shape[0] == n) else v) for k, v in arrays.items()}
    return out, found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recogdrive_jax.convert navsim-logs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs_dir", help="NAVSIM log folder of one split (navsim_logs/<split>/*.pkl)")
    ap.add_argument("sensor_blobs", help="sensor blob root of that split (sensor_blobs/<split>/)")
    ap.add_argument("out_dir", help="output folder (samples.npz [+ pdm_scenes.npz])")
    ap.add_argument("--metric_cache", default="", help="a `convert navsim-metric-cache` .npz (with tokens)")
    ap.add_argument("--num_history_frames", type=int, default=4)
    ap.add_argument("--num_future_frames", type=int, default=10)
    ap.add_argument("--frame_interval", type=int, default=None)
    ap.add_argument("--no_route_filter", action="store_true", help="keep chunks without roadblock_ids")
    ap.add_argument("--log_names", default="", help="comma list of log names to keep")
    args = ap.parse_args(argv)
    try:
        samples = convert_logs(args.logs_dir, args.sensor_blobs, args.num_history_frames, args.num_future_frames,
                               args.frame_interval, not args.no_route_filter,
                               [x for x in args.log_names.split(",") if x] or None)
        os.makedirs(args.out_dir, exist_ok=True)
        save_samples(os.path.join(args.out_dir, "samples.npz"), samples)
        msg = f"wrote {len(samples['tokens'])} samples to {os.path.join(args.out_dir, 'samples.npz')}"
        if args.metric_cache:
            scenes, found = select_metric_cache(args.metric_cache, samples["tokens"])
            tmp = os.path.join(args.out_dir, "pdm_scenes.tmp.npz")
            np.savez_compressed(tmp, **scenes)
            os.replace(tmp, os.path.join(args.out_dir, "pdm_scenes.npz"))
            msg += f"; PDM inputs for {int(found.sum())}/{len(found)} tokens from {args.metric_cache}"
    except (NavsimLogError, OSError, pickle.UnpicklingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
