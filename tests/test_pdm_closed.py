"""sim/pdm_closed.py against the unmodified NAVSIM v1.1 PDM-Closed, on the committed fixture
tests/fixtures/navsim_real_closed/ (120 scenes in which some proposal brakes behind a leader; make_fixture.py
regenerates it). CI only re-runs the JAX side on the committed files."""
import dataclasses
import glob
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from recogdrive_jax.sim import navsim_arrays, pdm, pdm_closed, world

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "navsim_real_closed")


@pytest.fixture(scope="module")
def fixture():
    real = dict(np.load(os.path.join(FIXTURE, "real.npz"), allow_pickle=False))
    paths = sorted(glob.glob(os.path.join(FIXTURE, "scenes", "scene_*.npz")))
    arrays = [navsim_arrays.load(p) for p in paths]
    assert [int(os.path.basename(p)[6:9]) for p in paths] == sorted(real["scene_index"])
    order = np.argsort(real["scene_index"])
    real = {k: (v[order] if v.ndim and len(v) == len(order) else v) for k, v in real.items()}
    scenes = world.stack_scenes([navsim_arrays.arrays_to_scene(a) for a in arrays])
    limits = np.array([float(a["speed_limit"]) for a in arrays])
    plans = np.stack([a["trajectories"] for a in arrays])
    return scenes, limits, plans, real, pdm_closed.pdm_closed(scenes, limits)


def test_fixture_exercises_leaders(fixture):
    _, _, _, real, _ = fixture
    n = len(real["best"])
    assert n >= 100 and real["brake_led"].any(-1).all()  # every scene: some proposal brakes behind a leader
    assert real["brake_led"][np.arange(n), real["best"]].mean() >= 0.25  # often the chosen one (32 of 120)
    assert len(np.unique(real["best"])) >= 3  # not always the same proposal


def test_same_proposal_and_poses_as_navsim(fixture):
    _, _, _, real, out = fixture
    agree = out["best"] == real["best"]
    assert agree.mean() >= 0.95, np.nonzero(~agree)
    err = np.abs(out["poses"] - real["poses"])[..., :2].max((-1, -2))  # [S] metres over 0..5 s
    assert err[agree].max() <= 0.05, err.max()
    np.testing.assert_allclose(out["scores"], real["proposal_scores"], rtol=0, atol=1e-6)  # poses agree to ~1e-7 m
    assert not jax.config.jax_enable_x64  # the float64 scope is local


def test_ep_with_jax_reference_matches_navsim(fixture):
    """Candidates scored against our PDM-Closed (sim/pdm.py, float64) vs against the real one (real scorer)."""
    scenes, _, plans, real, out = fixture
    with_ref = dataclasses.replace(scenes, ref_poses=out["poses"][:, :world.NUM_SIM_STATES].astype(np.float32))
    res = {k: np.asarray(v) for k, v in pdm.pdm_score(with_ref, plans, float64=True).items()}
    assert (np.abs(res["ep"] - real["ep"]) <= 1e-6).mean() >= 0.99
    for k in ("nc", "dac", "ttc", "c"):
        assert (res[k] == real[k]).all(), k
    np.testing.assert_allclose(res["ref_progress"], real["pdm_progress_raw"], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_regenerated_slice_matches_committed_fixture():
    """Where navsim-real is set up: re-export 8 scenes and re-run the real PDM-Closed and scorer on them."""
    sys.path.insert(0, os.path.join(FIXTURE, "..", "navsim_real"))
    try:
        import make_fixture
    finally:
        sys.path.pop(0)
    if not make_fixture.tool_available():
        pytest.skip("navsim-real is not set up (see ../shared/tools/navsim-real/README.md)")
    r = subprocess.run([sys.executable, os.path.join(FIXTURE, "make_fixture.py"), "--check", "0:8"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
