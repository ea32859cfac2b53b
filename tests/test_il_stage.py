"""The `il` stage end to end on a tiny planner: trains, evaluates (PDMS, ADE/FDE, plots), resumes, reads a cache."""
import json
import os

import numpy as np
import pytest

from recogdrive_jax import main as cli
from recogdrive_jax.configs import ConfigError, planner_stage_config
from recogdrive_jax.data import planner_data, scene_tokens
from recogdrive_jax.data.hidden_cache import CacheError, HiddenCache
from recogdrive_jax.train.metrics import read_metrics


def tiny_il(num_steps=6, **data):
    c = planner_stage_config("il", variant="tiny")
    c.train.num_steps = num_steps
    c.train.batch_size = 16
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.train.eval_every = 0
    c.train.tensorboard = False
    c.train.ema_decay = 0.9
    c.optim.lr = 1e-3
    c.data.num_train_scenes = 48
    c.data.num_eval_scenes = 16
    c.data.update(data)
    c.eval.batch_size = 16
    c.eval.num_plots = 2
    return c


def test_il_trains_evaluates_and_resumes(tmp_path):
    wd = str(tmp_path / "il")
    out = cli.run(tiny_il(num_steps=3), wd)
    for key in ("pdms", "ade", "fde", "nc", "dac", "ep", "comfort", "epdms"):
        assert np.isfinite(out[key]), key
    assert out["num_scenes"] == 16 and 0.0 <= out["pdms"] <= 1.0
    report = json.load(open(os.path.join(wd, "eval", "eval", "metrics.json")))
    assert report["num_scenes"] == 16
    assert "constant_velocity" in open(os.path.join(wd, "eval", "eval", "metrics.md")).read()
    plots = [f for d, _, fs in os.walk(os.path.join(wd, "plots")) for f in fs if f.endswith(".png")]
    assert len(plots) == 2
    # Same workdir, more steps: resumes at step 3 and continues (exactness of resume: tests/test_loop.py).
    cli.run(tiny_il(num_steps=6), wd)
    steps = [r["step"] for r in read_metrics(wd, "train")]
    assert steps == [2, 3, 4, 6]


def _write_cache(root, cfg, vl_dim):
    from recogdrive_jax.sim import scene_store
    for split in ("train", "eval"):
        scenes = planner_data.synthetic_scenes(cfg.data, split)
        tokens, mask = scene_tokens.scene_tokens(scenes, vl_dim)
        path = os.path.join(root, split)
        cache = HiddenCache.create(path, len(tokens), tokens.shape[1], vl_dim)
        cache.write(range(len(tokens)), tokens, mask)
        scene_store.save_scenes(os.path.join(path, "scenes.npz"), scenes)


def test_il_reads_cache_and_checks_width(tmp_path):
    cfg = tiny_il(num_steps=2)
    _write_cache(str(tmp_path / "cache"), cfg, vl_dim=32)  # tiny planner: vl_dim 32
    cfg.data.cache_dir = str(tmp_path / "cache")
    out = cli.run(cfg, str(tmp_path / "il"))
    assert np.isfinite(out["pdms"])
    bad = tiny_il(num_steps=2, cache_dir=str(tmp_path / "cache"))
    bad.planner.vl_dim = 48
    with pytest.raises(CacheError, match="hidden size 32 does not match config.planner.vl_dim=48"):
        cli.run(bad, str(tmp_path / "bad"))


def test_planner_config_errors_name_the_key(tmp_path):
    cfg = tiny_il()
    cfg.planner.kind = "transformer"
    with pytest.raises(ConfigError, match="config.planner"):
        cli.run(cfg, str(tmp_path / "x"))


def test_mlp_head_is_selectable(tmp_path):
    cfg = tiny_il(num_steps=2)
    cfg.lock()  # as `--config.planner.kind=mlp` meets it: a locked config takes only keys it has
    cfg.planner.kind = "mlp"
    out = cli.run(cfg, str(tmp_path / "mlp"))
    assert np.isfinite(out["pdms"]) and np.isfinite(out["ade"])
