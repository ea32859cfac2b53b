"""convert navsim-metric-cache: numpy-only (runs inside a NAVSIM environment, no jax), and on real `MetricCache`
pickles, written by NAVSIM's own `MetricCache.dump` + `save_cache_metadata`, the project's scorer on the converted
scenes equals the real NAVSIM v1.1 scorer on the cache (slow; needs ../shared/tools/navsim-real)."""
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERTER = os.path.join(ROOT, "recogdrive_jax", "convert", "navsim_metric_cache.py")
FIXTURE_SCENES = os.path.join(ROOT, "tests", "fixtures", "navsim_real", "scenes")
NAVSIM_TOOL = os.environ.get("NAVSIM_REAL_TOOL", os.path.join(os.path.dirname(ROOT), "shared", "tools", "navsim-real"))
NAVSIM_PYTHON = os.environ.get("NAVSIM_REAL_PYTHON", os.path.join(tempfile.gettempdir(), "navsim-venv", "bin", "python"))
NAVSIM_SRC = os.environ.get("NAVSIM_REAL_SRC", os.path.join(tempfile.gettempdir(), "navsim-src"))
SUB_METRICS = ("nc", "dac", "ddc", "ttc", "ep", "c", "pdms")


def test_converter_imports_without_jax(tmp_path):
    """Inside a NAVSIM environment there is no jax/flax: the converter and the scene format it writes need numpy."""
    code = ("import sys; sys.modules['jax'] = None; sys.modules['flax'] = None\n"
            "from recogdrive_jax.convert import navsim_metric_cache as conv\n"
            "assert not any(m.startswith(('jax', 'flax')) and sys.modules[m] is not None for m in sys.modules)\n"
            "assert conv.fmt.__name__ == 'recogdrive_jax.sim.scene_format'\n"
            "try:\n"
            f"    conv.main([{str(tmp_path / 'missing')!r}, {str(tmp_path / 'out.npz')!r}])\n"
            "except SystemExit as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=subprocess_env(devices=1), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "missing: not a directory" in r.stdout


def test_scene_format_writer_is_what_the_store_reads(tmp_path):
    """The converter writes with scene_format (numpy only); the project reads with scene_store: one format."""
    from recogdrive_jax.sim import scene_format, scene_store, world

    scenes = world.generate_scenes(2, seed=5, reference="expert")
    scene_format.save_scene_arrays(str(tmp_path / "s.npz"), scenes, extra={"tokens": np.array(["a", "b"])})
    back = scene_store.load_scenes(str(tmp_path / "s.npz"))
    assert list(scene_store.load_tokens(str(tmp_path / "s.npz"))) == ["a", "b"]
    for k in world.SCENE_SCHEMA:
        np.testing.assert_array_equal(getattr(back, k), np.stack([getattr(s, k) for s in scenes]), err_msg=k)
    assert world.Scene is scene_format.Scene and world.POLY_VERTS == scene_format.POLY_VERTS


# Run by the navsim-real venv: the tool builds real MetricCache objects from the project's array scenes (the
# real PDM-Closed plans each reference, as metric caching does), NAVSIM's MetricCache.dump pickles them (lzma) at
# <cache>/<log>/<scenario_type>/<token>/metric_cache.pkl, nuPlan's save_cache_metadata lists them, and the real
# pdm_score scores the scenes' candidate plans on the caches loaded back by NAVSIM's MetricCacheLoader.
_MAKE_AND_SCORE_CACHE = r"""
import sys
from pathlib import Path
import numpy as np
tool, cache_dir, out = sys.argv[1:4]
sys.path.insert(0, tool)
import navsim_real_pdm as nr
from nuplan.planning.training.experiments.cache_metadata_entry import CacheMetadataEntry, save_cache_metadata
from navsim.common.dataclasses import Trajectory
from navsim.common.dataloader import MetricCacheLoader
from navsim.evaluate.pdm_score import pdm_score

entries, trajs = {}, {}
for i, path in enumerate(sys.argv[4:]):
    scene, trajectories = nr.load_scene_npz(path)
    scene.pop("pdm_closed_trajectory", None)
    cache, _ = nr.build_metric_cache(scene)
    token = f"tok{i:04d}"
    cache.file_path = Path(cache_dir) / f"log{i % 3}" / "synthetic_scene" / token / "metric_cache.pkl"
    cache.file_path.parent.mkdir(parents=True, exist_ok=True)
    cache.dump()
    entries[token] = CacheMetadataEntry(cache.file_path)
    trajs[token] = trajectories
save_cache_metadata(list(entries.values()), Path(cache_dir), 0)
loader = MetricCacheLoader(Path(cache_dir))
simulator = nr.PDMSimulator(nr.PROPOSAL_SAMPLING)
scorer = nr.PDMScorer(nr.PROPOSAL_SAMPLING, nr.PDMScorerConfig())
tokens = sorted(loader.tokens)
res = {k: [] for k in ("nc", "dac", "ddc", "ttc", "ep", "c", "pdms")}
for token in tokens:
    cache = loader.get_from_token(token)
    rows = {k: [] for k in res}
    for poses in trajs[token]:
        r = pdm_score(cache, Trajectory(np.asarray(poses, np.float64)), simulator.proposal_sampling, simulator, scorer)
        for k, v in (("nc", r.no_at_fault_collisions), ("dac", r.drivable_area_compliance),
                     ("ddc", r.driving_direction_compliance), ("ttc", r.time_to_collision_within_bound),
                     ("ep", r.ego_progress), ("c", r.comfort), ("pdms", r.score)):
            rows[k].append(v)
    for k in res:
        res[k].append(rows[k])
np.savez(out, tokens=np.array(tokens), trajectories=np.stack([trajs[t] for t in tokens]),
         **{k: np.array(v, np.float64) for k, v in res.items()})
"""


@pytest.mark.slow
def test_real_metric_cache_converts_and_scores_as_navsim(tmp_path):
    """20 project scenes x 12 plans: real MetricCache pickles -> convert navsim-metric-cache (run by the NAVSIM
    venv's Python as a plain script: NAVSIM's numpy, no jax) -> scene store -> sim/pdm.py (float64) equals the real
    NAVSIM v1.1 pdm_score on the same caches, on every sub-metric of every pair."""
    if not (os.path.isfile(os.path.join(NAVSIM_TOOL, "navsim_real_pdm.py")) and os.path.isfile(NAVSIM_PYTHON)
            and os.path.isfile(os.path.join(NAVSIM_SRC, "navsim", "evaluate", "pdm_score.py"))):
        pytest.skip("navsim-real is not set up (NAVSIM_REAL_TOOL / NAVSIM_REAL_PYTHON / NAVSIM_REAL_SRC)")
    from recogdrive_jax.sim import pdm, scene_store

    scenes = [os.path.join(FIXTURE_SCENES, f"scene_{i:03d}.npz") for i in range(20)]
    env = dict(os.environ, PYTHONPATH=NAVSIM_SRC)
    cache = tmp_path / "metric_cache"
    r = subprocess.run([NAVSIM_PYTHON, "-c", _MAKE_AND_SCORE_CACHE, NAVSIM_TOOL, str(cache), str(tmp_path / "real.npz"),
                        *scenes], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list(cache.glob("log*/synthetic_scene/tok*/metric_cache.pkl"))) == 20
    r = subprocess.run([NAVSIM_PYTHON, CONVERTER, str(cache), str(tmp_path / "scenes.npz")], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    real = dict(np.load(tmp_path / "real.npz"))
    tokens = scene_store.load_tokens(str(tmp_path / "scenes.npz"))
    order = [list(tokens).index(t) for t in real["tokens"]]
    batch = scene_store.load_scenes(str(tmp_path / "scenes.npz"))
    batch = type(batch)(**{k: np.asarray(v)[order] for k, v in vars(batch).items()})
    out = pdm.pdm_score(batch, real["trajectories"], float64=True)
    for k in SUB_METRICS:
        mine = np.asarray(out[k])
        if k in ("ep", "pdms"):  # the scene file stores float32 (PDM-Closed's reference poses): measured 2e-7
            bad = ~np.isclose(mine, real[k], rtol=0.0, atol=1e-6)
        else:
            bad = mine != real[k]
        assert not bad.any(), (k, int(bad.sum()), np.argwhere(bad)[:5].tolist())
    for k in ("nc", "dac", "ttc", "ep"):  # the pairs exercise what they compare
        assert (real[k] < 1).any(), k
    print(f"{real['pdms'].size} pairs agree on every sub-metric; failing pairs in the real scores: "
          + ", ".join(f"{k} {int((real[k] < 1).sum())}" for k in SUB_METRICS[:-1])
          + f"; EP max |d| {np.abs(np.asarray(out['ep']) - real['ep']).max():.1e}, "
          f"PDMS max |d| {np.abs(np.asarray(out['pdms']) - real['pdms']).max():.1e}")
