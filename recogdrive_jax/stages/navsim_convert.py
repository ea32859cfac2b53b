"""Stage `navsim_convert`: NAVSIM logs (or a fake split from the synthetic world) -> the converted per-split folders
the NAVSIM data path reads (`config.data.source='navsim'`, `config.data.navsim_dir=WORKDIR`).

The same conversion as `python -m recogdrive_jax.convert navsim-logs` (convert/navsim_logs.py), as a stage so a
pipeline (configs/navsim_fake.py) runs convert -> cache -> il -> rl -> eval in one command. Real logs:
`navsim.logs_dir` / `navsim.sensor_blobs_dir` are NAVSIM's `navsim_logs` / `sensor_blobs` roots and
`navsim.split_dirs` maps each project split to NAVSIM's folder (e.g. 'train:trainval,eval:test,test:test');
`navsim.metric_cache` (a `convert navsim-metric-cache` .npz or folder of <split>.npz) adds the PDM inputs.
`navsim.fake=True` first writes a tiny fake split (convert/navsim_fake_split.py) under WORKDIR/fake and converts that.
Writes WORKDIR/<split>/samples.npz (+ pdm_scenes.npz); a rerun overwrites them (conversion is cheap).
"""
from __future__ import annotations

import os

import numpy as np

from recogdrive_jax import configs, provenance
from recogdrive_jax.convert import navsim_logs
from recogdrive_jax.data import planner_data
from recogdrive_jax.convert import navsim_fake_split


def _split_dirs(text: str) -> dict[str, str]:
    out = {}
    for item in [x for x in text.split(",") if x]:
        mine, _, theirs = item.partition(":")
        if mine not in planner_data.SPLITS or not theirs:
            raise configs.ConfigError(f"config.navsim.split_dirs: {item!r} is not '<split>:<navsim folder>' with "
                                      f"<split> in {list(planner_data.SPLITS)}")
        out[mine] = theirs
    if not out:
        raise configs.ConfigError("config.navsim.split_dirs: empty")
    return out


def run(config, workdir: str) -> dict:
    config = configs.validate_common(config)
    n = config.navsim
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    provenance.write_config(config, workdir)
    splits = _split_dirs(n.split_dirs)
    logs_dir, blobs_dir, metric_cache = n.logs_dir, n.sensor_blobs_dir, n.metric_cache
    if n.fake:
        fake = os.path.join(workdir, "fake")
        splits = {s: s for s in splits}
        navsim_fake_split.write_fake_split(fake, list(splits), int(n.fake_logs), int(n.fake_scenes_per_log),
                                           int(n.fake_seed))
        logs_dir, blobs_dir = os.path.join(fake, "navsim_logs"), os.path.join(fake, "sensor_blobs")
        metric_cache = os.path.join(fake, "metric_cache")
    for key, value in (("logs_dir", logs_dir), ("sensor_blobs_dir", blobs_dir)):
        if not value:
            raise configs.ConfigError(f"config.navsim.{key}: required (or config.navsim.fake=True)")
    counts = {}
    for split, theirs in splits.items():
        try:
            samples = navsim_logs.convert_logs(os.path.join(logs_dir, theirs), os.path.join(blobs_dir, theirs),
                                               int(n.num_history_frames), int(n.num_future_frames),
                                               int(n.frame_interval) or None)
        except navsim_logs.NavsimLogError as e:
            raise configs.ConfigError(f"config.navsim.logs_dir: {e}") from None
        out = os.path.join(workdir, split)
        os.makedirs(out, exist_ok=True)
        navsim_logs.save_samples(os.path.join(out, "samples.npz"), samples)
        found = 0
        if metric_cache:
            path = metric_cache if metric_cache.endswith(".npz") else os.path.join(metric_cache, f"{split}.npz")
            if not os.path.isfile(path):
                raise configs.ConfigError(f"config.navsim.metric_cache={metric_cache!r}: {path} does not exist")
            scenes, has = navsim_logs.select_metric_cache(path, samples["tokens"])
            np.savez_compressed(os.path.join(out, "pdm_scenes.npz"), **scenes)
            found = int(has.sum())
        counts[split] = len(samples["tokens"])
        print(f"[navsim_convert] {split}: {counts[split]} samples from {os.path.join(logs_dir, theirs)}, PDM inputs "
              f"for {found}", flush=True)
    return {f"{s}_samples": v for s, v in counts.items()}
