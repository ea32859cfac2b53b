"""The generic loop: mesh invariance, exact kill-and-resume, restore onto another mesh, multi-host, knobs."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from recogdrive_jax.parallel import mesh as mesh_lib
from recogdrive_jax.train import checkpoint as ckpt_lib
from recogdrive_jax.train import loop
from recogdrive_jax.train.metrics import read_metrics

import toy_task
from conftest import subprocess_env

TESTS = os.path.dirname(os.path.abspath(__file__))
KEYS = ("loss", "mae", "grad_norm", "param_norm", "lr")


def _run(tmp_path, name, mesh_sizes=None, devices=None, noise=0.01, **overrides):
    config = toy_task.toy_config(**overrides)
    mesh = None
    if mesh_sizes is not None:
        mesh = mesh_lib.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_sizes)), devices=devices)
    workdir = str(tmp_path / name)
    state, _ = loop.train(config, workdir, toy_task.make_task(config, noise=noise), mesh=mesh)
    return state, read_metrics(workdir, "train")


def _losses(rows):
    return np.array([r["loss"] for r in rows])


def test_same_losses_on_different_meshes(tmp_path):
    _, a = _run(tmp_path, "a", (8, 1, 1))
    _, b = _run(tmp_path, "b", (2, 4, 1))
    _, c = _run(tmp_path, "c", (1, 1, 1), devices=jax.devices()[:1])
    assert len(a) == 12
    np.testing.assert_allclose(_losses(a), _losses(b), atol=1e-5, rtol=0)
    np.testing.assert_allclose(_losses(a), _losses(c), atol=1e-5, rtol=0)
    assert _losses(a)[-3:].mean() < _losses(a)[:3].mean()  # it learns


def test_grad_accum_matches_full_batch(tmp_path):
    # Noise-free loss: micro-batches draw their own rngs, so only a deterministic loss can match exactly.
    _, full = _run(tmp_path, "full", (8, 1, 1), noise=0.0, **{"train.num_steps": 4})
    _, acc = _run(tmp_path, "acc", (8, 1, 1), noise=0.0, **{"train.num_steps": 4, "optim.grad_accum": 2})
    np.testing.assert_allclose(_losses(full), _losses(acc), atol=1e-5, rtol=0)


def test_freeze_pattern_keeps_params(tmp_path):
    config = toy_task.toy_config(**{"train.num_steps": 3, "optim.freeze": ("fc1/.*",)})
    task = toy_task.make_task(config)
    init = task.init_params(jax.random.split(jax.random.key(config.seed))[0])
    state, _ = loop.train(config, str(tmp_path / "frozen"), task)
    np.testing.assert_array_equal(np.asarray(state.params["fc1"]["kernel"]), np.asarray(init["fc1"]["kernel"]))
    assert not np.array_equal(np.asarray(state.params["fc2"]["kernel"]), np.asarray(init["fc2"]["kernel"]))


def test_ema_tracks_params(tmp_path):
    state, _ = _run(tmp_path, "ema", (8, 1, 1), **{"train.num_steps": 3})
    config = toy_task.toy_config(**{"train.num_steps": 3})
    task = toy_task.make_task(config)
    task.ema_decay = 0.5
    state, _ = loop.train(config, str(tmp_path / "ema2"), task)
    assert state.ema_params is not None
    ema, p = np.asarray(state.ema_params["fc2"]["kernel"]), np.asarray(state.params["fc2"]["kernel"])
    assert not np.array_equal(ema, p) and np.abs(ema - p).max() < 0.1


def test_restore_onto_other_mesh(tmp_path):
    """An uninterrupted 8-step run on a data-parallel mesh vs the same run stopped after checkpoint 4 and resumed
    on an FSDP mesh: the restored params land on the new shardings and the later losses match."""
    state_a, rows_a = _run(tmp_path, "a", (8, 1, 1), **{"train.num_steps": 8})
    # The same run as of its step-4 checkpoint: a copy without the later step (as if it had stopped there).
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("metrics.jsonl"))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "8")
    config = toy_task.toy_config(**{"train.num_steps": 8})
    mesh_b = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    state_b, _ = loop.train(config, str(tmp_path / "b"), toy_task.make_task(config), mesh=mesh_b)
    rows_b = read_metrics(str(tmp_path / "b"), "train")
    assert int(state_b.step) == 8 and [r["step"] for r in rows_b] == [5, 6, 7, 8]
    kernel = state_b.params["fc1"]["kernel"]
    assert "fsdp" in str(kernel.sharding.spec)
    # Another mesh reduces in another order: equal to float tolerance (as test_same_losses_on_different_meshes).
    for k in KEYS:
        np.testing.assert_allclose([r[k] for r in rows_b], [r[k] for r in rows_a[4:]], rtol=1e-5, atol=1e-6,
                                   err_msg=k)
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(state_a.params["fc1"]["kernel"]), rtol=1e-5,
                               atol=1e-6)


def test_init_from_mismatch_names_keys(tmp_path):
    ckpt_lib.save_params(str(tmp_path / "p"), {"other": np.zeros((3,), np.float32)})
    config = toy_task.toy_config(**{"train.num_steps": 1, "train.init_from": str(tmp_path / "p")})
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"does not match the model: .*4 missing: fc1/bias, "
                       r"fc1/kernel, fc2/bias, fc2/kernel; 1 unexpected: other") as e:
        loop.train(config, str(tmp_path / "w"), toy_task.make_task(config))
    assert str(tmp_path / "p") in str(e.value) and "\n" not in str(e.value)


def test_non_finite_loss_is_reported(tmp_path):
    config = toy_task.toy_config(**{"train.num_steps": 2, "optim.lr": 1e30, "optim.clip_norm": 0.0})
    task = toy_task.make_task(config)
    with pytest.raises(loop.NonFiniteLossError, match="loss became"):
        loop.train(config, str(tmp_path / "nan"), task)


def _script(workdir, *extra, env=None):
    cmd = [sys.executable, os.path.join(TESTS, "toy_task.py"), "--workdir", str(workdir), *extra]
    return subprocess.Popen(cmd, env=env or dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _by_step(workdir):
    rows = {}
    for r in read_metrics(str(workdir), "train"):
        rows[r["step"]] = r  # the resumed run's line wins
    return rows


def test_kill_and_resume_is_exact(tmp_path):
    ref = _script(tmp_path / "ref")
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    victim = _script(tmp_path / "victim", "--sleep_after_checkpoint", "0.4")
    committed = tmp_path / "victim" / "checkpoints" / "4"
    deadline = time.time() + 240
    while not committed.is_dir() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    assert committed.is_dir(), "checkpoint 4 never appeared"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    before = _by_step(tmp_path / "victim")
    assert max(before) < 12, "the run finished before it was killed"
    resumed = _script(tmp_path / "victim")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    a, b = _by_step(tmp_path / "ref"), _by_step(tmp_path / "victim")
    assert sorted(b) == list(range(1, 13))
    for step in range(5, 13):
        for k in KEYS:
            assert a[step][k] == b[step][k], (step, k, a[step][k], b[step][k])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    one = _script(tmp_path / "one", "--set", "train.num_steps=6")
    assert one.wait(timeout=300) == 0, one.stdout.read()
    port = _free_port()
    procs = []
    for pid in range(2):
        env = subprocess_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                             JAX_PROCESS_ID=str(pid))
        procs.append(_script(tmp_path / "two", "--set", "train.num_steps=6", env=env))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    a, b = _by_step(tmp_path / "one"), _by_step(tmp_path / "two")
    assert sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5, (step, a[step]["loss"], b[step]["loss"])
