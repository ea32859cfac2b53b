"""Remote workdirs and caches (`gs://`) through `recogdrive_jax.storage`, against a real GCS protocol server.

`gcp-storage-emulator` (the `test` extra) serves the GCS JSON API on 127.0.0.1; the libraries are pointed at it by
their own emulator settings: `STORAGE_EMULATOR_HOST` for gcsfs (etils.epath's gs:// backend: config.json,
metrics.jsonl, TensorBoard events, data-iterator states, eval reports, PNGs) and, through `storage`,
`TENSORSTORE_GCS_HTTP_URL` for TensorStore's `gcs` kvstore (Orbax's arrays, the hidden-state cache). Nothing here
may create a local directory named `gs:`.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from gcs_emulator import BUCKET, emulator, gcs  # noqa: F401  (fixtures; the emulator and its header fix live there)
from gcs_emulator import emulator_env as _emulator_env
from gcs_emulator import free_port as _free_port
from gcs_emulator import no_local_gs_dirs as _no_local_gs_dirs
from gcs_emulator import objects as _objects

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def test_paths_stay_urls():
    from recogdrive_jax import storage
    assert storage.abspath("gs://b/run/") == "gs://b/run"
    assert storage.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
    assert storage.abspath("rel") == os.path.abspath("rel")
    assert storage.tensorstore_kvstore("gs://b/run/cache/train/hidden") == {
        "driver": "gcs", "bucket": "b", "path": "run/cache/train/hidden/"}
    assert storage.tensorstore_kvstore("/x/y") == {"driver": "file", "path": "/x/y"}
    with pytest.raises(storage.StorageError, match="ftp://h/x"):
        storage.tensorstore_kvstore("ftp://h/x")


def test_checkpoints_metrics_config_round_trip_and_resume_on_gcs(gcs, tmp_path, monkeypatch):
    """The pieces a gs:// run writes (Orbax checkpoints + data-iterator state, metrics.jsonl, TensorBoard events,
    config.json) land in the bucket, and a second Checkpointer on the same URL resumes from the newest step."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from recogdrive_jax import provenance, storage
    from recogdrive_jax.train import checkpoint as ckpt_lib
    from recogdrive_jax.train import metrics as metrics_lib
    monkeypatch.chdir(tmp_path)
    run = f"gs://{BUCKET}/unit/run"
    assert storage.check_writable(run) == run
    provenance.write_config(ml_collections.ConfigDict({"stage": "il", "seed": 3}), run)
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.array(0)}
    ck = ckpt_lib.Checkpointer(run, keep=2)
    for step in (1, 2, 3):
        ck.save(step, jax.tree.map(lambda x: x + step, state), data_state={"epoch": 0, "pos": step})
    ck.close()
    w = metrics_lib.MetricWriter(run, tensorboard=True)
    w.write(1, "train", {"loss": 1.5})
    w.close()
    w = metrics_lib.MetricWriter(run, tensorboard=False)  # a resumed run appends to the same object
    w.write(2, "train", {"loss": 1.25})
    w.close()

    objects = _objects(run)
    assert "unit/run/config.json" in objects and "unit/run/metrics.jsonl" in objects
    assert any(o.startswith("unit/run/tensorboard/events.out.tfevents") for o in objects)
    assert "unit/run/checkpoints/3/commit_success.txt" in objects
    assert not any(o.startswith("unit/run/checkpoints/1/") for o in objects)  # keep=2 deleted step 1
    assert provenance.read_config(run)["seed"] == 3
    assert [r["loss"] for r in metrics_lib.read_metrics(run, "train")] == [1.5, 1.25]

    resumed = ckpt_lib.Checkpointer(run, keep=2)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=jax.sharding.SingleDeviceSharding(
                                                               jax.devices()[0])), state)
    step, got = resumed.restore_latest(abstract)
    assert step == 3 and resumed.data_state(3) == {"epoch": 0, "pos": 3}
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(state["w"]) + 3)
    resumed.close()
    _no_local_gs_dirs(tmp_path)


def test_unfinished_gcs_step_is_never_resumed(gcs, caplog):
    """On gs:// Orbax saves in place; a step directory without commit_success.txt (a killed save) is skipped."""
    import jax
    import jax.numpy as jnp

    from recogdrive_jax import storage
    from recogdrive_jax.train import checkpoint as ckpt_lib
    run = f"gs://{BUCKET}/unit/killed"
    ck = ckpt_lib.Checkpointer(run, async_save=False)
    ck.save(1, {"w": jnp.ones(3)})
    ck.close()
    storage.write_text(f"{run}/checkpoints/2/state/_METADATA", "{}")  # a save cut short: no commit file
    abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(
        jax.devices()[0]))}
    step, got = ckpt_lib.Checkpointer(run, async_save=False).restore_latest(abstract)
    assert step == 1 and float(got["w"].sum()) == 3.0


def test_hidden_cache_round_trips_on_gcs(gcs, tmp_path, monkeypatch):
    from recogdrive_jax import storage
    from recogdrive_jax.data.hidden_cache import CacheError, HiddenCache
    monkeypatch.chdir(tmp_path)
    path = f"gs://{BUCKET}/cache/train"
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]], bool)
    cache = HiddenCache.create(path, num_samples=4, max_len=5, hidden_size=4, layout="upstream_compatible")
    cache.write([0, 2, 3], hidden, mask)
    assert "cache/train/meta.json" in _objects(path)
    assert any(o.startswith("cache/train/hidden/") for o in _objects(path))

    again = HiddenCache.open(path)  # a reader in another run: only what the bucket holds
    assert list(again.pending(range(4))) == [1]
    states, got_mask = again.read([0, 2, 3])
    for b in range(3):
        np.testing.assert_array_equal(states[b][got_mask[b]], hidden[b][mask[b]])
    with pytest.raises(CacheError, match="rows \\[1\\] were never written"):
        again.read([1])
    with pytest.raises(CacheError, match="different geometry"):  # resume checks against the bucket's meta.json
        HiddenCache.create(path, num_samples=5, max_len=5, hidden_size=4, layout="upstream_compatible")
    assert storage.tree_size(f"{path}/hidden") > 0
    _no_local_gs_dirs(tmp_path)


def _cli(args, env, cwd, timeout=600):
    from conftest import subprocess_env
    return subprocess.run([sys.executable, "-m", "recogdrive_jax.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=subprocess_env(2, PYTHONPATH=ROOT, **env))


def test_unreachable_gcs_workdir_fails_at_start_up_naming_it(tmp_path):
    """No server behind the URL: one `error:` line naming it, exit 2, within 10 s, nothing created locally."""
    url = f"gs://{BUCKET}/nowhere/run"
    t0 = time.time()
    r = _cli([f"--config={TESTS}/configs/tiny_il.py", f"--workdir={url}"],
             _emulator_env(f"http://127.0.0.1:{_free_port()}"), cwd=tmp_path, timeout=60)
    elapsed = time.time() - t0
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert lines[-1].startswith("error: ") and url in lines[-1], r.stderr[-2000:]
    assert sum(l.startswith("error:") for l in lines) == 1
    assert elapsed < 10, f"start-up failure took {elapsed:.1f} s"
    _no_local_gs_dirs(tmp_path)


def test_stage_without_remote_outputs_refuses_a_gcs_workdir(tmp_path):
    """A stage that still writes local files only (here `navsim_convert`, as a pipeline step: start-up checks every
    step before anything runs or connects) is one `error:` line naming the stage and the URL."""
    url = f"gs://{BUCKET}/fake"
    r = _cli([f"--config={ROOT}/configs/navsim_fake.py:navsim", f"--workdir={url}"], {}, cwd=tmp_path, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: pipeline step 'navsim': --workdir=gs://"), r.stderr
    assert f"{url}/navsim" in last and "'navsim_convert'" in last
    _no_local_gs_dirs(tmp_path)


@pytest.mark.slow  # two il runs (~2 min on 2 cores); the cheap non-slow cover is the round-trip test above
def test_il_cli_on_gcs_workdir_writes_and_resumes(emulator, tmp_path):
    """`python -m recogdrive_jax.main --workdir=gs://...` for `il`: config, metrics, TensorBoard, checkpoints,
    eval report and plot land in the bucket; rerunning with more steps resumes from the newest checkpoint."""
    from recogdrive_jax import storage
    # One compilation cache for both runs: the resumed run reuses the first one's programs.
    env = dict(_emulator_env(emulator), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    run = f"gs://{BUCKET}/cli/il"
    cfg = f"--config={TESTS}/configs/tiny_il.py"
    r = _cli([cfg, f"--workdir={run}"], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    os.environ.update(env)
    storage.configure_emulator()
    objects = _objects(run)
    for want in ("cli/il/config.json", "cli/il/metrics.jsonl", "cli/il/checkpoints/2/commit_success.txt",
                 "cli/il/checkpoints/data/2/process_0.json", "cli/il/eval/eval/metrics.json",
                 "cli/il/eval/eval/metrics.md"):
        assert want in objects, (want, objects)
    assert any(o.startswith("cli/il/tensorboard/events.out.tfevents") for o in objects)
    assert any(o.startswith("cli/il/plots/step_000002/") and o.endswith(".png") for o in objects)

    r = _cli([cfg, f"--workdir={run}", "--config.train.num_steps=3"], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]  # step 3 only: resumed, not retrained
    assert "cli/il/checkpoints/3/commit_success.txt" in _objects(run)
    _no_local_gs_dirs(tmp_path)
