"""Converted NAVSIM data as planner-stage scenes (`config.data.source='navsim'`).

`config.data.navsim_dir` holds one folder per project split (`<navsim_dir>/<split>/samples.npz`, written by
`python -m recogdrive_jax.convert navsim-logs`): the planner inputs per sample token (history, ego status, command,
8-pose future) and the front-camera path. The PDM inputs (map, objects, PDM-Closed reference) come from a converted
metric cache (`convert navsim-metric-cache`, scene store + `tokens`), matched by token: `config.data.navsim_metric_cache`
(a .npz used for every split, or a folder with `<split>.npz`), else `<navsim_dir>/<split>/pdm_scenes.npz`
(`convert navsim-logs --metric_cache`). Stages that score plans (rl, eval, il's evaluation) need them; where a
split has them for only some tokens, those tokens are scored (as NAVSIM's run_pdm_score.py scores the tokens that
have both a scene and a metric cache). Everything is loaded with `allow_pickle=False`.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from recogdrive_jax.errors import UserError
from recogdrive_jax.sim import scene_store, world

SAMPLES_FORMAT_VERSION = 1
SAMPLE_SCHEMA = {  # name -> (shape after the leading N, dtype kind)
    "tokens": ((), "U"), "log_names": ((), "U"), "history": ((world.NUM_HISTORY, 3), "f"),
    "future": ((world.NUM_PLAN_POSES, 3), "f"), "status": ((8,), "f"), "command": ((), "i"),
    "camera_front": ((), "U"),
}


class NavsimDataError(UserError):
    pass


@dataclasses.dataclass
class NavsimSplit:
    """One split's converted samples as a batched `world.Scene` (+ tokens, camera paths). `has_pdm` [N]: whether the
    scene's PDM fields come from the metric cache (else they are zeros and must not be scored)."""
    scenes: world.Scene
    tokens: np.ndarray  # [N] str
    cameras: np.ndarray  # [N] str
    has_pdm: np.ndarray  # [N] bool

    def subset(self, idx) -> "NavsimSplit":
        idx = np.asarray(idx)
        return NavsimSplit(world.Scene(**{k: np.asarray(getattr(self.scenes, k))[idx] for k in world.SCENE_SCHEMA}),
                           self.tokens[idx], self.cameras[idx], self.has_pdm[idx])


def samples_path(data_cfg, split: str) -> str:
    root = data_cfg.get("navsim_dir", "") or ""
    if not root:
        raise NavsimDataError("config.data.navsim_dir: required with config.data.source='navsim' (the output root of "
                              "`python -m recogdrive_jax.convert navsim-logs`, one <split>/ folder per split)")
    return os.path.join(root, split, "samples.npz")


def load_samples(path: str) -> dict:
    """samples.npz -> validated arrays (the message names the file and field)."""
    if not os.path.isfile(path):
        raise NavsimDataError(f"{path}: no such file (write it with `python -m recogdrive_jax.convert navsim-logs "
                              "LOGS SENSOR_BLOBS <navsim_dir>/<split>`)")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise NavsimDataError(f"{path}: not a readable samples .npz ({e})") from e
    out = {}
    with data:
        version = int(data["__format_version__"]) if "__format_version__" in data.files else None
        if version != SAMPLES_FORMAT_VERSION:
            raise NavsimDataError(f"{path}: format version {version}, expected {SAMPLES_FORMAT_VERSION}")
        n = None
        for name, (shape, kind) in SAMPLE_SCHEMA.items():
            if name not in data.files:
                raise NavsimDataError(f"{path}: missing field '{name}'")
            try:
                arr = data[name]
            except ValueError as e:
                raise NavsimDataError(f"{path}: field '{name}' is not a plain array ({e})") from e
            n = arr.shape[0] if n is None and arr.ndim else n
            if arr.dtype.kind != kind or arr.shape != (n,) + shape:
                raise NavsimDataError(f"{path}: field '{name}' has {arr.dtype} {arr.shape}, expected kind {kind!r} "
                                      f"shape {(n,) + shape}")
            if kind == "f" and not np.all(np.isfinite(arr)):
                raise NavsimDataError(f"{path}: field '{name}' contains NaN or Inf")
            out[name] = arr
    if not n:
        raise NavsimDataError(f"{path}: no samples")
    return out


def metric_cache_path(data_cfg, split: str) -> str | None:
    """The converted metric cache for `split`, or None where none is configured or written."""
    given = data_cfg.get("navsim_metric_cache", "") or ""
    if given:
        path = given if given.endswith(".npz") else os.path.join(given, f"{split}.npz")
        if not os.path.isfile(path):
            raise NavsimDataError(f"config.data.navsim_metric_cache={given!r}: {path} does not exist (a "
                                  "`convert navsim-metric-cache` .npz, or a folder with <split>.npz)")
        return path
    path = os.path.join(data_cfg.navsim_dir, split, "pdm_scenes.npz")
    return path if os.path.isfile(path) else None


def scenes_from_samples(samples: dict) -> world.Scene:
    """Planner inputs from the logs; PDM fields zero (filled from the metric cache by `attach_pdm`)."""
    n = len(samples["tokens"])
    fields = {k: np.zeros((n,) + shape, dtype) for k, (shape, dtype) in world.SCENE_SCHEMA.items()}
    fields["history"] = samples["history"].astype(np.float32)
    fields["status"] = samples["status"].astype(np.float32)
    fields["expert"] = samples["future"].astype(np.float32)
    fields["command"] = samples["command"].astype(np.int32)
    fields["seed"] = np.arange(n, dtype=np.int64)  # the row: cache.py checks cached scenes by it
    return world.Scene(**fields)


def attach_pdm(scenes: world.Scene, tokens: np.ndarray, cache_path: str | None) -> tuple[world.Scene, np.ndarray]:
    """Scenes with the metric cache's PDM fields where its tokens match; the planner inputs stay the logs'."""
    n = len(tokens)
    has = np.zeros(n, bool)
    if cache_path is None:
        return scenes, has
    cached = scene_store.load_scenes(cache_path)
    ctoks = scene_store.load_tokens(cache_path)
    if ctoks is None:
        raise NavsimDataError(f"{cache_path}: no 'tokens' field (rewrite it with `convert navsim-metric-cache`)")
    if np.asarray(cached.history).ndim == 2:
        cached = world.stack_scenes([cached])
    where = {str(t): i for i, t in enumerate(ctoks.tolist())}
    src = np.array([where.get(str(t), -1) for t in tokens.tolist()])
    has = src >= 0
    keep = ("history", "status", "expert", "command", "seed")
    fields = {}
    for k in world.SCENE_SCHEMA:
        v = np.array(getattr(scenes, k))
        if k not in keep and has.any():
            v[has] = np.asarray(getattr(cached, k))[src[has]]
        fields[k] = v
    return world.Scene(**fields), has


def load_navsim_split(data_cfg, split: str, need_pdm: bool) -> NavsimSplit:
    """One split's samples (+ PDM inputs). `need_pdm`: keep only tokens with PDM inputs, error where none has."""
    samples = load_samples(samples_path(data_cfg, split))
    scenes, has = attach_pdm(scenes_from_samples(samples), samples["tokens"], metric_cache_path(data_cfg, split))
    out = NavsimSplit(scenes, samples["tokens"], samples["camera_front"], has)
    return require_pdm(out, split) if need_pdm else out


def require_pdm(split_data: NavsimSplit, split: str) -> NavsimSplit:
    if not split_data.has_pdm.any():
        raise NavsimDataError(
            f"config.data.navsim_metric_cache: split {split!r} has no PDM inputs (maps, objects, PDM-Closed reference), "
            "which scoring plans needs (rl, eval, il's evaluation): convert NAVSIM's metric cache with `python -m "
            "recogdrive_jax.convert navsim-metric-cache` and name it there (or pass --metric_cache to navsim-logs)")
    if split_data.has_pdm.all():
        return split_data
    missing = int((~split_data.has_pdm).sum())
    print(f"[navsim] {split}: {missing} of {len(split_data.tokens)} tokens have no metric cache; scoring the others "
          "(as NAVSIM's run_pdm_score.py)", flush=True)
    return split_data.subset(np.flatnonzero(split_data.has_pdm))
