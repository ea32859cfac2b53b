"""Checkpoint faults never lose the last good state: a corrupt newest step falls back to the newest intact one
(bitwise-identical resume, nothing deleted), a NaN/inf state is never saved, and resuming with another model size
is one `error:` line."""
import glob
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from recogdrive_jax.errors import UserError
from recogdrive_jax.train import checkpoint as ckpt_lib
from recogdrive_jax.train import loop
from recogdrive_jax.train.metrics import read_metrics

import toy_task
from conftest import subprocess_env

KEYS = ("loss", "mae", "grad_norm", "param_norm", "lr")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**kw):
    return toy_task.toy_config(**{"train.num_steps": 6, "train.checkpoint_every": 3, **kw})


def _task(config):
    task = toy_task.make_task(config)
    task.ema_decay = 0.5  # the EMA is part of the state that must survive
    return task


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints 3 and 6): its workdir, final state and metric rows."""
    wd = str(tmp_path_factory.mktemp("ref") / "run")
    state, _ = loop.train(_config(), wd, _task(_config()))
    return wd, state, read_metrics(wd, "train")


def _truncate_chunk(step_dir):
    chunks = sorted(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)
    with open(chunks[-1], "r+b") as f:  # the largest array chunk loses its second half
        f.truncate(os.path.getsize(chunks[-1]) // 2)
    return chunks[-1]


def _delete_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _half_written(step_dir):
    # What a kill during Orbax's save leaves: the step still under its temporary name, not all files written.
    tmp = step_dir + ".orbax-checkpoint-tmp-1700000000000000"
    os.rename(step_dir, tmp)
    os.remove(os.path.join(tmp, "state", "_METADATA"))
    return tmp


@pytest.mark.parametrize("fault", [_truncate_chunk, _delete_metadata, _half_written], ids=lambda f: f.__name__[1:])
def test_corrupt_latest_falls_back_and_resumes_bitwise(reference, tmp_path, fault, caplog):
    ref_wd, ref_state, ref_rows = reference
    wd = str(tmp_path / "run")
    shutil.copytree(ref_wd, wd)
    ckpts = os.path.join(wd, "checkpoints")
    fault(os.path.join(ckpts, "6"))
    before = sorted(os.path.relpath(p, ckpts) for p in glob.glob(os.path.join(ckpts, "**"), recursive=True))
    with caplog.at_level(logging.WARNING):
        state, _ = loop.train(_config(), wd, _task(_config()))
    warned = [r.getMessage() for r in caplog.records if "resuming from step 3" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and ckpts in warned[0], caplog.text
    rows = read_metrics(wd, "train")[len(ref_rows):]  # the rerun's own rows
    assert [r["step"] for r in rows] == [4, 5, 6]
    for r in rows:
        for k in KEYS:
            assert r[k] == ref_rows[r["step"] - 1][k], (r["step"], k)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Nothing deleted: every file of the faulty step is still there (moved under corrupt/ when it was a step).
    after = {os.path.relpath(p, ckpts) for p in glob.glob(os.path.join(ckpts, "**"), recursive=True)}
    moved = {p.replace("6/", "corrupt/6/", 1) if p.startswith("6/") else p for p in before}
    assert moved - {"6"} <= after | {"corrupt/6"}, sorted(moved - after)
    assert os.path.isdir(os.path.join(ckpts, "6", "state"))  # the new step 6


def test_every_step_unreadable_is_one_error(reference, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(reference[0], wd)
    for step in ("3", "6"):
        _delete_metadata(os.path.join(wd, "checkpoints", step))
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint in .* can be read") as e:
        loop.train(_config(), wd, _task(_config()))
    assert "\n" not in str(e.value) and os.path.isdir(os.path.join(wd, "checkpoints", "6"))


def _all_float_leaves(item_dir):
    tree = ocp.PyTreeCheckpointHandler().restore(epath.Path(item_dir))
    return [np.asarray(x) for x in jax.tree.leaves(tree) if np.issubdtype(np.asarray(x).dtype, np.floating)]


def _steps(wd):
    return sorted(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit())


def test_nan_guard_keeps_the_newest_finite_state(tmp_path):
    wd = str(tmp_path / "nan")
    knobs = {"train.num_steps": 8, "train.checkpoint_every": 1, "optim.warmup_ratio": 0.0}
    bad = _config(**knobs, **{"optim.lr": 1e6})  # no warm-up: the first update already moves every weight by ~1e6
    with pytest.raises(loop.NonFiniteLossError) as e:
        loop.train(bad, wd, _task(bad))
    kept = _steps(wd)[-1]
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert f"at step {kept + 1}" in msg and f"step {kept} in {wd}" in msg and "rerun resumes from it" in msg
    leaves = _all_float_leaves(os.path.join(wd, "checkpoints", str(kept), "state"))
    assert len(leaves) == 16  # params, EMA, Adam mu and nu: 4 arrays each
    assert all(np.isfinite(x).all() for x in leaves)
    # A rerun at a sane lr resumes from exactly that step. The kept state is finite but already blown up in
    # magnitude by lr 1e6, so its next loss is inf again: the guard stops at the same step and keeps the same one.
    good = _config(**knobs, **{"optim.lr": 1e-3})
    with pytest.raises(loop.NonFiniteLossError) as e2:
        loop.train(good, wd, _task(good))
    assert f"at step {kept + 1}" in str(e2.value) and f"step {kept} in" in str(e2.value)
    assert _steps(wd)[-1] == kept
    assert all(np.isfinite(x).all() for x in _all_float_leaves(os.path.join(wd, "checkpoints", str(kept), "state")))


def test_nan_guard_resume_continues_a_recoverable_run(tmp_path):
    """A finite kept state that is still usable (the blow-up came later): the sane-lr rerun resumes there and
    finishes with every leaf finite."""
    wd = str(tmp_path / "nan")
    knobs = {"train.num_steps": 8, "train.checkpoint_every": 2, "optim.warmup_ratio": 0.5}
    bad = _config(**knobs, **{"optim.lr": 1e6})  # warm-up from 0: step 1 is harmless (lr 0), later steps explode
    with pytest.raises(loop.NonFiniteLossError):
        loop.train(bad, wd, _task(bad))
    kept = _steps(wd)[-1]
    assert all(np.isfinite(x).all() for x in _all_float_leaves(os.path.join(wd, "checkpoints", str(kept), "state")))
    n_rows = len(read_metrics(wd, "train"))
    good = _config(**knobs, **{"optim.lr": 1e-3})
    state, _ = loop.train(good, wd, _task(good))
    assert [r["step"] for r in read_metrics(wd, "train")[n_rows:]] == list(range(kept + 1, 9))
    assert int(state.step) == 8 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_final_forced_save_of_a_non_finite_state_is_refused(tmp_path):
    wd = str(tmp_path / "nan")
    bad = _config(**{"train.num_steps": 2, "train.checkpoint_every": 0, "optim.lr": 1e6, "optim.warmup_ratio": 0.0,
                     "optim.clip_norm": 0.0})
    with pytest.raises(loop.NonFiniteLossError, match="after step 2 are not finite .*no checkpoint was saved"):
        loop.train(bad, wd, _task(bad))
    assert not [n for n in os.listdir(os.path.join(wd, "checkpoints")) if n[0].isdigit()]


IL_CONFIG = '''
from recogdrive_jax import configs


def get_config():
    c = configs.planner_stage_config("il", variant="tiny")
    c.train.update(dict(num_steps=2, batch_size=16, log_every=1, tensorboard=False))
    c.data.update(dict(num_train_scenes=32, num_eval_scenes=8))
    return c
'''


def test_resume_with_another_model_size_is_one_error_line(tmp_path):
    """An il workdir of the tiny planner resumed as tiny4: exit 2, one `error:` line naming the checkpoint
    directory and the first mismatched shapes (not Orbax's multi-kilobyte tree diff)."""
    from recogdrive_jax import configs
    from recogdrive_jax.models.planner import build_planner, planner_config
    from recogdrive_jax.train import optim
    from recogdrive_jax.train.module_def import ModuleDef
    from recogdrive_jax.train.state import init_train_state
    cfg_file = tmp_path / "il_tiny.py"
    cfg_file.write_text(IL_CONFIG)
    config = configs.load_config_file(str(cfg_file)).get_config()
    wd = tmp_path / "il"
    # The checkpoint the il stage writes at a step: TrainState(params, Adam state, EMA) of the tiny planner.
    params = ModuleDef(lambda r: build_planner(planner_config("tiny"), r)).init(jax.random.key(0))
    tx = optim.make_optimizer(config.optim, 2, params)
    ckptr = ckpt_lib.Checkpointer(str(wd), async_save=False)
    ckptr.save(1, init_train_state(params, tx, ema=True))
    ckptr.close()
    env = subprocess_env(8)
    proc = subprocess.run([sys.executable, "-m", "recogdrive_jax.main", f"--config={cfg_file}",
                           "--config.planner.variant=tiny4", f"--workdir={wd}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and err[-1].startswith("error: ")
    last = err[-1]
    assert f"{wd}/checkpoints/1 does not match the model" in last
    assert "shape mismatch(es): params/action_decoder/fc1/bias (32,) vs model (64,)" in last
    assert "missing: params/model/transformer_blocks/2/" in last
    assert len(last) < 1500 and len(proc.stderr) < 4000, len(proc.stderr)
