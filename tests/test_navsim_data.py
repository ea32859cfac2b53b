"""The NAVSIM real-data path: convert navsim-logs (numpy only, NAVSIM's chunking and pose conventions) on a fake split
written in NAVSIM's on-disk layout, PDM inputs by token, NAVSIM's result CSV, and the whole path
fake split -> convert -> cache -> il -> rl -> eval -> CSV (configs/navsim_fake.py, the README's one line)."""
import csv
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from conftest import subprocess_env
from recogdrive_jax.convert import navsim_logs
from recogdrive_jax.eval import navsim_csv
from recogdrive_jax.convert import navsim_fake_split
from recogdrive_jax.sim import scene_store, world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("navsim_fake"))
    tokens = navsim_fake_split.write_fake_split(out, splits=("train",), num_logs=2, scenes_per_log=2, seed=3,
                                                reference="expert")  # no PDM-Closed compile: not scored here
    return out, tokens


def test_converter_imports_and_runs_without_jax(fake, tmp_path):
    """Inside a NAVSIM environment there is no jax/flax: the converter module needs numpy only."""
    out, _ = fake
    code = ("import sys; sys.modules['jax'] = None; sys.modules['flax'] = None\n"
            "from recogdrive_jax.convert import navsim_logs\n"
            "assert not any(m.startswith(('jax', 'flax')) and sys.modules[m] is not None for m in sys.modules)\n"
            f"sys.exit(navsim_logs.main([{out + '/navsim_logs/train'!r}, {out + '/sensor_blobs/train'!r}, "
            f"{str(tmp_path / 'conv')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=subprocess_env(devices=1), timeout=60)
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(tmp_path / "conv" / "samples.npz")


def test_fake_split_converts_back_to_the_scenes(fake, tmp_path):
    out, tokens = fake
    rc = navsim_logs.main([f"{out}/navsim_logs/train", f"{out}/sensor_blobs/train", str(tmp_path),
                           "--metric_cache", f"{out}/metric_cache/train.npz"])
    assert rc == 0
    s = np.load(tmp_path / "samples.npz", allow_pickle=False)
    scenes = scene_store.load_scenes(f"{out}/metric_cache/train.npz")
    assert s["tokens"].tolist() == tokens["train"]
    # each log holds 2 NAVSIM scenes of 4 + 10 frames; the token is the current (4th) frame's
    frames = pickle.load(open(f"{out}/navsim_logs/train/faketrain00.pkl", "rb"))
    assert len(frames) == 28 and frames[3]["token"] == tokens["train"][0] and frames[17]["token"] == tokens["train"][1]
    np.testing.assert_allclose(s["history"], scenes.history, atol=1e-5)
    np.testing.assert_allclose(s["future"], scenes.expert, atol=1e-5)
    np.testing.assert_array_equal(s["status"], scenes.status)
    np.testing.assert_array_equal(s["command"], scenes.command)
    assert all(os.path.isfile(p) for p in s["camera_front"])
    pdm = np.load(tmp_path / "pdm_scenes.npz", allow_pickle=False)
    assert pdm["tokens"].tolist() == tokens["train"]
    np.testing.assert_array_equal(pdm["drivable"], scenes.drivable)


def test_navsim_conventions():
    """pyquaternion's yaw (w, x, y, z) and NAVSIM's global->local, on hand-computed cases."""
    for yaw in (-3.0, -1.0, 0.0, 0.4, 2.9):
        assert abs(navsim_logs.quaternion_yaw(navsim_logs.yaw_quaternion(yaw)) - yaw) < 1e-12
    assert abs(navsim_logs.quaternion_yaw([2.0, 0, 0, 0]) - 0.0) < 1e-12  # normalised first
    rel = navsim_logs.absolute_to_relative(np.array([10.0, 5.0, np.pi / 2]), np.array([[10.0, 7.0, np.pi]]))
    np.testing.assert_allclose(rel, [[2.0, 0.0, np.pi / 2]], atol=1e-12)
    frames = [{"roadblock_ids": ["r"] if i != 10 else []} for i in range(30)]
    chunks = navsim_logs.scene_chunks(frames, 4, 10, None)
    assert len(chunks) == 2 and chunks[0][0] is frames[0] and chunks[1][0] is frames[14]
    # starts 0, 7, 14, 21: 21 is short, 7's current frame (10) has no route
    assert [c[0] for c in navsim_logs.scene_chunks(frames, 4, 10, 7)] == [frames[0], frames[14]]


def test_bad_log_names_file_and_key(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    with open(d / "a.pkl", "wb") as f:
        pickle.dump([{"token": "t"}] * 14, f)
    with pytest.raises(navsim_logs.NavsimLogError, match=r"a\.pkl frame 0: missing key 'ego2global_translation'"):
        navsim_logs.convert_logs(str(d), str(tmp_path), has_route=False)


def test_navsim_csv_matches_v1_1_layout(tmp_path):
    """Header as v1.1's run_pdm_score.py writes it with pandas (unnamed index first), average row last."""
    per = {"nc": [1.0, 0.0], "dac": [1.0, 1.0], "ep": [0.5, np.nan], "ttc": [1.0, 1.0], "comfort": [1.0, 1.0],
           "ddc": [1.0, 0.5], "pdms": [0.9, 0.0]}
    path = navsim_csv.write_csv(str(tmp_path), ["tokA", "tokB"], per)
    rows = list(csv.reader(open(path)))
    assert rows[0] == ["", "token", "valid", "no_at_fault_collisions", "drivable_area_compliance", "ego_progress",
                       "time_to_collision_within_bound", "comfort", "driving_direction_compliance", "score"]
    assert rows[1] == ["0", "tokA", "True", "1.0", "1.0", "0.5", "1.0", "1.0", "1.0", "0.9"]
    assert rows[2][:6] == ["1", "tokB", "True", "0.0", "1.0", ""]
    assert rows[3] == ["2", "average", "True", "0.5", "1.0", "0.5", "1.0", "1.0", "0.75", "0.45"]


def test_scoring_without_pdm_inputs_names_the_key(fake, tmp_path):
    from recogdrive_jax import configs
    from recogdrive_jax.data import navsim_data, planner_data
    out, _ = fake
    navsim_logs.main([f"{out}/navsim_logs/train", f"{out}/sensor_blobs/train", str(tmp_path / "train")])
    d = configs.planner_data_block(source="navsim", navsim_dir=str(tmp_path))
    split = planner_data.load_split(d, "train", 16)  # il's training split: no PDM needed
    assert len(split) == 4 and split.tokens is not None
    with pytest.raises(navsim_data.NavsimDataError, match="config.data.navsim_metric_cache"):
        planner_data.load_split(d, "train", 16, need_pdm=True)
    d.navsim_metric_cache = f"{out}/metric_cache"
    scored = planner_data.load_split(d, "train", 16, need_pdm=True)
    ref = scene_store.load_scenes(f"{out}/metric_cache/train.npz")
    np.testing.assert_array_equal(scored.scenes.ref_poses, ref.ref_poses)


def test_navsim_real_path_end_to_end(tmp_path):
    """The README's one line (configs/navsim_fake.py) in-process: fake NAVSIM split -> convert -> cache (tiny VLM,
    the NAVSIM prompt) -> il -> rl -> eval -> NAVSIM's CSV with one row per test token plus the average."""
    from recogdrive_jax import configs
    from recogdrive_jax.stages import pipeline
    cfg = configs.load_config_file(os.path.join(ROOT, "configs", "navsim_fake.py")).get_config()
    for step in ("il", "rl"):
        cfg.pipeline.configs[step].train.num_steps = 1
    work = str(tmp_path / "run")
    pipeline.run(cfg, work)
    samples = np.load(os.path.join(work, "navsim", "test", "samples.npz"), allow_pickle=False)
    rows = list(csv.reader(open(os.path.join(work, "eval", "eval", "test", navsim_csv.FILE_NAME))))
    assert tuple(rows[0]) == navsim_csv.COLUMNS
    assert [r[1] for r in rows[1:-1]] == samples["tokens"].tolist() and rows[-1][1] == "average"
    assert all(0.0 <= float(r[-1]) <= 1.0 for r in rows[1:])
    cached = scene_store.load_tokens(os.path.join(work, "cache", "train", "scenes.npz"))
    assert cached.tolist() == np.load(os.path.join(work, "navsim", "train", "samples.npz"))["tokens"].tolist()


NAVSIM_SRC = os.environ.get("NAVSIM_REAL_SRC", os.path.join(__import__("tempfile").gettempdir(), "navsim-src"))
NAVSIM_PYTHON = os.environ.get("NAVSIM_REAL_PYTHON",
                               os.path.join(__import__("tempfile").gettempdir(), "navsim-venv", "bin", "python"))
_SCENE_LOADER = r"""
import sys
from pathlib import Path
import numpy as np
from navsim.common.dataclasses import Scene, SceneFilter, SensorConfig
from navsim.common.dataloader import SceneLoader
Scene._build_map_api = classmethod(lambda cls, name: None)  # no nuPlan maps offline; nothing compared reads the map
logs, blobs, out = sys.argv[1:4]
loader = SceneLoader(Path(logs), Path(blobs), SceneFilter(), SensorConfig.build_no_sensors())
tokens = list(loader.tokens)
fut, hist, vel, acc, cmd = [], [], [], [], []
for t in tokens:
    fut.append(loader.get_scene_from_token(t).get_future_trajectory(8).poses)
    ego = loader.get_agent_input_from_token(t).ego_statuses
    hist.append(np.stack([e.ego_pose for e in ego]))
    vel.append(ego[-1].ego_velocity); acc.append(ego[-1].ego_acceleration); cmd.append(ego[-1].driving_command)
np.savez(out, tokens=np.array(tokens), future=np.array(fut), history=np.array(hist), velocity=np.array(vel),
         acceleration=np.array(acc), command=np.array(cmd))
"""


@pytest.mark.slow
def test_navsim_scene_loader_agrees_with_convert_navsim_logs(fake, tmp_path):
    """NAVSIM v1.1's own SceneLoader/Scene/AgentInput (navsim-real venv) on the fake split vs convert navsim-logs,
    itself run as a plain script by that venv's Python (NAVSIM's numpy, no jax): future trajectory, history, ego
    status and driving command per token."""
    if not (os.path.isfile(NAVSIM_PYTHON) and os.path.isfile(os.path.join(NAVSIM_SRC, "navsim", "common",
                                                                          "dataloader.py"))):
        pytest.skip("navsim-real is not set up (NAVSIM_REAL_PYTHON / NAVSIM_REAL_SRC; ../shared/tools/navsim-real)")
    out, _ = fake
    logs, blobs = f"{out}/navsim_logs/train", f"{out}/sensor_blobs/train"
    env = dict(os.environ, PYTHONPATH=NAVSIM_SRC)
    r = subprocess.run([NAVSIM_PYTHON, os.path.join(ROOT, "recogdrive_jax", "convert", "navsim_logs.py"), logs, blobs,
                        str(tmp_path / "conv")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([NAVSIM_PYTHON, "-c", _SCENE_LOADER, logs, blobs, str(tmp_path / "navsim.npz")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = np.load(tmp_path / "navsim.npz")
    mine = np.load(tmp_path / "conv" / "samples.npz")
    order = [mine["tokens"].tolist().index(t) for t in ref["tokens"].tolist()]
    assert sorted(ref["tokens"].tolist()) == sorted(mine["tokens"].tolist()) and len(order) == 4
    np.testing.assert_allclose(mine["future"][order], ref["future"], atol=1e-5)
    np.testing.assert_allclose(mine["history"][order], ref["history"], atol=1e-5)
    np.testing.assert_array_equal(mine["status"][order, 4:6], ref["velocity"])
    np.testing.assert_array_equal(mine["status"][order, 6:8], ref["acceleration"])
    np.testing.assert_array_equal(mine["status"][order, :4], ref["command"])


def test_navsim_cache_then_eval_writes_the_csv(tmp_path):
    """The cheaper slice of the real path (no planner training): fake split -> convert -> cache -> eval of the
    constant-velocity baseline on the NAVSIM cache (PDM inputs attached by token) -> NAVSIM's CSV."""
    from recogdrive_jax import configs
    from recogdrive_jax.stages import pipeline
    cfg = configs.load_config_file(os.path.join(ROOT, "configs", "navsim_fake.py")).get_config("navsim,cache,eval")
    cfg.pipeline.configs.navsim.navsim.fake_scenes_per_log = 2
    cfg.pipeline.configs.cache.cache.splits = "test"
    cfg.pipeline.configs.eval.eval.baseline = "constant_velocity"
    work = str(tmp_path / "run")
    pipeline.run(cfg, work)
    tokens = np.load(os.path.join(work, "navsim", "test", "samples.npz"))["tokens"].tolist()
    assert scene_store.load_tokens(os.path.join(work, "cache", "test", "scenes.npz")).tolist() == tokens
    rows = list(csv.reader(open(os.path.join(work, "eval", "eval", "test", navsim_csv.FILE_NAME))))
    assert [r[1] for r in rows[1:]] == tokens + ["average"] and len(tokens) == 4
    cv = [float(r[-1]) for r in rows[1:-1]]
    assert all(0.0 <= v <= 1.0 for v in cv) and abs(float(rows[-1][-1]) - np.mean(cv)) < 1e-12
