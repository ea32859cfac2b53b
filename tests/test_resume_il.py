"""Kill-and-resume on a real stage: an `il` run (tiny DiT, shuffled Grain iterator) SIGKILLed one step after a
checkpoint resumes to bitwise the same later losses, eval and params as an uninterrupted run, across an epoch
boundary. Run as a script it is the stage run itself (optionally killing itself), so the test can SIGKILL it."""
import argparse
import os
import signal
import subprocess
import sys
import time

TESTS = os.path.dirname(os.path.abspath(__file__))
STEPS, CKPT_EVERY, KILL_BEFORE = 4, 2, 4  # killed after step 3 (checkpoint 2 committed), before step 4
SCENES, BATCH = 40, 16  # 2.5 batches per epoch: step 3 (resumed) straddles the first epoch boundary


def il_config():
    from recogdrive_jax import configs
    c = configs.planner_stage_config("il", variant="tiny")
    c.train.update(dict(num_steps=STEPS, batch_size=BATCH, log_every=1, checkpoint_every=CKPT_EVERY, eval_every=0,
                        ema_decay=0.9, tensorboard=False))
    c.optim.lr = 1e-3
    c.data.update(dict(num_train_scenes=SCENES, num_eval_scenes=8))
    c.eval.update(dict(batch_size=8, num_plots=0))
    return c


class KillBefore:
    """Wraps the stage's train iterator: SIGKILLs this process when batch `step` is asked for, once the checkpoint
    before it is committed (a kill `step - 1 - CKPT_EVERY * k` steps after that checkpoint)."""

    def __init__(self, it, step: int, ckpt_dir: str):
        self.it, self.step, self.calls = it, step, 0
        self.committed = os.path.join(ckpt_dir, str((step - 1) // CKPT_EVERY * CKPT_EVERY))

    def __iter__(self):
        return self

    def __next__(self):
        self.calls += 1
        if self.calls == self.step:
            deadline = time.time() + 120
            while not os.path.isdir(self.committed) and time.time() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def _main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--kill_before_step", type=int, default=0)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(TESTS))
    from recogdrive_jax import main as cli
    from recogdrive_jax.data import planner_data
    if args.kill_before_step:
        orig = planner_data.train_iterator
        ckpt_dir = os.path.join(args.workdir, "checkpoints")
        planner_data.train_iterator = lambda *a, **k: KillBefore(orig(*a, **k), args.kill_before_step, ckpt_dir)
    cli.run(il_config(), args.workdir)


def _run(workdir, *extra, env):
    cmd = [sys.executable, os.path.abspath(__file__), "--workdir", str(workdir), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _by_step(workdir, split):
    from recogdrive_jax.train.metrics import read_metrics
    rows = {}
    for r in read_metrics(str(workdir), split):
        rows[r["step"]] = r  # the resumed run's line wins
    return rows


def _same_row(a, b):
    keys = {k for k in a if "per_sec" not in k and k not in ("time", "elapsed")}
    return {k: (a[k], b.get(k)) for k in keys if a[k] != b.get(k)}


def test_il_sigkill_after_checkpoint_resumes_bitwise(tmp_path):
    import jax
    import numpy as np

    from recogdrive_jax.models.planner import build_planner, planner_config
    from recogdrive_jax.train import checkpoint as ckpt_lib
    from recogdrive_jax.train.metrics import read_metrics
    from recogdrive_jax.train.module_def import ModuleDef
    from conftest import subprocess_env
    # Two devices (a data-parallel mesh; ZeRO-1 shards the optimizer state) keep it cheap; one compilation cache
    # for the three processes lets the victim and the resumed run reuse the reference's programs.
    env = subprocess_env(2, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
                         JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    ref = _run(tmp_path / "ref", env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    victim = _run(tmp_path / "victim", "--kill_before_step", str(KILL_BEFORE), env=env)
    assert victim.returncode == -signal.SIGKILL, victim.stderr[-3000:]
    ckpts = tmp_path / "victim" / "checkpoints"
    assert sorted(n for n in os.listdir(ckpts) if n.isdigit()) == ["2"]
    assert [r["step"] for r in read_metrics(str(tmp_path / "victim"), "train")] == [1, 2, 3]  # one step past it
    resumed = _run(tmp_path / "victim", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(str(tmp_path / "victim"), "train")][3:] == list(range(3, STEPS + 1))
    a, b = _by_step(tmp_path / "ref", "train"), _by_step(tmp_path / "victim", "train")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert not _same_row(a[step], b[step]), (step, _same_row(a[step], b[step]))
    ea, eb = _by_step(tmp_path / "ref", "eval"), _by_step(tmp_path / "victim", "eval")
    assert list(ea) == list(eb) == [STEPS] and not _same_row(ea[STEPS], eb[STEPS]), _same_row(ea[STEPS], eb[STEPS])
    mdef = ModuleDef(lambda r: build_planner(planner_config("tiny"), r))
    abstract = mdef.abstract_params()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = ckpt_lib.attach_shardings(abstract, jax.tree.map(lambda _: one, abstract))
    for ema in (False, True):
        pa = ckpt_lib.load_params(str(tmp_path / "ref"), target, prefer_ema=ema)
        pb = ckpt_lib.load_params(str(tmp_path / "victim"), target, prefer_ema=ema)
        for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


if __name__ == "__main__":
    _main()
