"""config.json says what produced a run (commit, package versions, devices); `eval` records what it scored."""
import json
import os
import subprocess

import jax
import ml_collections
import numpy as np
import pytest

from recogdrive_jax import provenance
from recogdrive_jax.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_json_records_commit_versions_and_devices(tmp_path):
    c = ml_collections.ConfigDict({"stage": "il", "train": {"num_steps": 2}})
    provenance.write_config(c, str(tmp_path), extra={"scored": {"step": 3}})
    got = json.load(open(tmp_path / "config.json"))
    assert got["stage"] == "il" and got["train"] == {"num_steps": 2} and got["scored"] == {"step": 3}
    p = got["provenance"]
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # in a checkout (CI's clean clone is one)
        assert p["git"]["commit"] == head.stdout.strip() and isinstance(p["git"]["dirty"], bool)
    for name in ("jax", "flax", "orbax-checkpoint", "grain", "tensorstore", "transformers"):
        assert p["packages"][name], name
    assert p["packages"]["jax"] == jax.__version__
    assert p["devices"]["device_count"] == jax.device_count()
    assert p["devices"]["device_kind"] == jax.devices()[0].device_kind


def test_outside_a_checkout_the_commit_is_none(monkeypatch):
    monkeypatch.setenv("GIT_DIR", "/nonexistent/not-a-repo")  # every git call fails, as outside a checkout
    assert provenance.git_info.__wrapped__() == {"commit": None, "dirty": None}
    monkeypatch.setattr(provenance.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError()))
    assert provenance.git_info.__wrapped__() == {"commit": None, "dirty": None}  # no git binary at all


def test_checkpoint_ref_names_the_latest_step(tmp_path):
    ckptr = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
    for step in (3, 5):
        ckptr.save(step, {"w": np.full((2,), step, np.float32)}, force=True)
    ckptr.close()
    assert ckpt_lib.checkpoint_ref(str(tmp_path)) == {"path": str(tmp_path), "step": 5}
    assert ckpt_lib.checkpoint_ref(str(tmp_path / "params_only")) == {"path": str(tmp_path / "params_only"),
                                                                         "step": None}


class _Stop(Exception):
    pass


def test_eval_stage_writes_its_config_with_the_scored_checkpoint(tmp_path, monkeypatch):
    from recogdrive_jax import configs
    from recogdrive_jax.data import planner_data
    from recogdrive_jax.stages import eval as eval_stage
    run_dir = tmp_path / "rl"
    ckptr = ckpt_lib.Checkpointer(str(run_dir), async_save=False)
    ckptr.save(7, {"w": np.zeros((2,), np.float32)}, force=True)
    ckptr.close()
    c = configs.planner_stage_config("eval", variant="tiny4")
    c.eval.checkpoint = str(run_dir)

    def stop(*a, **k):  # the config must be on disk before any scoring starts
        raise _Stop()
    monkeypatch.setattr(planner_data, "load_split", stop)
    with pytest.raises(_Stop):
        eval_stage.run(c, str(tmp_path / "eval"))
    got = json.load(open(tmp_path / "eval" / "config.json"))
    assert got["stage"] == "eval" and got["eval"]["checkpoint"] == str(run_dir)
    assert got["scored"] == {"checkpoint": {"path": str(run_dir), "step": 7}, "use_ema": True}
    assert got["provenance"]["devices"]["device_count"] == jax.device_count()
