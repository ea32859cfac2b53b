"""User mistakes on the command line end in one line naming the problem and a non-zero exit."""
import os
import subprocess
import sys

import pytest

from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "tests", "configs", "base_only.py")


def _main(*args, workdir):
    env = subprocess_env(8)
    return subprocess.run([sys.executable, "-m", "recogdrive_jax.main", f"--config={CFG}", *args,
                           f"--workdir={workdir}"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


@pytest.mark.parametrize("arg,expect", [
    ("--config.train.num_stepz=3", "num_stepz"),
    ("--config.trian.num_steps=3", "trian"),
    ("--config.train.num_steps=abc", "num_steps"),
    ("--config.stage=nonsense", "allowed: ["),
    ("--config.mesh.data=3", "config.mesh"),
    ("--config.optim.grad_accum=3", "config.optim.grad_accum"),
    ("--config.optim.schedule=linear", "config.optim.schedule"),
])
def test_bad_config_is_one_clear_line(tmp_path, arg, expect):
    r = _main(arg, workdir=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], r.stderr


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _main(workdir=blocker / "sub")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--workdir" in r.stderr and "not writable" in r.stderr


def test_convert_unknown_command():
    r = subprocess.run([sys.executable, "-m", "recogdrive_jax.convert", "nope"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "allowed" in r.stderr
