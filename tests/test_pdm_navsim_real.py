"""sim/pdm.py against the unmodified NAVSIM v1.1 scorer, on the committed fixture tests/fixtures/navsim_real/.

The fixture holds 240 project scenes x 12 plan kinds exported as navsim-real array scenes and the real scorer's
sub-scores on them (make_fixture.py regenerates both; see its README). CI only re-scores the committed files.
"""
import glob
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from recogdrive_jax.sim import navsim_arrays, pdm, world

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "navsim_real")
DISCRETE = ("nc", "dac", "ddc", "ttc", "c")
CONTINUOUS_ATOL = {"float64": 1e-9, "float32": 1e-4}  # EP / PDMS (NAVSIM runs float64)


@pytest.fixture(scope="module")
def fixture():
    paths = sorted(glob.glob(os.path.join(FIXTURE, "scenes", "scene_*.npz")))
    real = dict(np.load(os.path.join(FIXTURE, "scores.npz"), allow_pickle=False))
    arrays = [navsim_arrays.load(p) for p in paths]
    assert [int(os.path.basename(p)[6:9]) for p in paths] == list(real["scene_index"])
    scenes = world.stack_scenes([navsim_arrays.arrays_to_scene(a) for a in arrays])
    trajs = np.stack([a["trajectories"] for a in arrays])  # [S, 12, 8, 3]
    return scenes, trajs, real


def _disagreements(out, real, atol):
    bad = {k: np.asarray(out[k]) != real[k] for k in DISCRETE}
    for k in ("ep", "pdms"):
        bad[k] = ~np.isclose(np.asarray(out[k]), real[k], rtol=0.0, atol=atol)
    return bad


def test_fixture_exercises_every_sub_metric(fixture):
    scenes, trajs, real = fixture
    assert trajs.shape == (240, 12, 8, 3) and len(real["plan_kinds"]) == 12
    for k in ("nc", "dac", "ddc", "ttc", "ep", "c"):
        assert (real[k] < 1).mean() >= 0.05, k  # each sub-metric fails on >= 5 % of the pairs
    flags = real["reversed_heading"]
    assert 0 < flags.mean() < 0.01  # the float32 exemption stays a small, rule-defined set


def test_float64_agrees_with_navsim_on_every_pair(fixture):
    scenes, trajs, real = fixture
    out = pdm.pdm_score(scenes, trajs, float64=True)
    assert out["pdms"].dtype == np.float64
    assert not jax.config.jax_enable_x64 and jax.numpy.zeros(1).dtype == np.float32  # the x64 scope is local
    for k, bad in _disagreements(out, real, CONTINUOUS_ATOL["float64"]).items():
        assert not bad.any(), (k, np.argwhere(bad)[:5])
    np.testing.assert_allclose(np.asarray(out["progress"]), real["progress_raw"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["ref_progress"]), real["pdm_progress_raw"], rtol=0, atol=1e-6)


def test_float32_agrees_with_navsim_except_reversed_heading(fixture):
    scenes, trajs, real = fixture
    out = pdm.pdm_score(scenes, trajs)
    assert out["pdms"].dtype == np.float32
    keep = ~real["reversed_heading"]
    for k, bad in _disagreements(out, real, CONTINUOUS_ATOL["float32"]).items():
        assert not (bad & keep).any(), (k, np.argwhere(bad & keep)[:5])


def test_navsim_arrays_round_trip(tmp_path):
    """What the real scorer reads (navsim_arrays.save) is exactly the Scene sim/pdm.py scores."""
    for seed in (1, 2, 3):  # straight / curve / junction draws
        sc = world.generate_scene(seed, reference="expert")
        navsim_arrays.save(str(tmp_path / "s.npz"), navsim_arrays.scene_to_arrays(sc))
        back = navsim_arrays.arrays_to_scene(navsim_arrays.load(str(tmp_path / "s.npz")))
        for k in world.SCENE_SCHEMA:
            a, b = getattr(sc, k), getattr(back, k)
            assert a.dtype == b.dtype and a.shape == b.shape, k
            if k == "obj_speed":  # re-derived as |(v cos h, v sin h)|, as the real scorer sees it
                np.testing.assert_allclose(a, b, rtol=1e-6)
            else:
                np.testing.assert_array_equal(a, b, err_msg=k)


def test_regulariser_matrices():
    navsim = pdm.velocity_fit_regulariser(6, "navsim")  # [4, 6] over [v0, a_0..a_4]
    nuplan = pdm.velocity_fit_regulariser(6, "nuplan")
    np.testing.assert_array_equal(nuplan[:, 1:], np.eye(4, 5, 1) - np.eye(4, 5))  # first differences (jerk)
    expect = -np.eye(4, 5)
    expect[-1, -1] = 1.0  # NAVSIM overwrites the +1 band except in the last row
    np.testing.assert_array_equal(navsim[:, 1:], expect)
    assert not navsim[:, 0].any() and not nuplan[:, 0].any()
    with pytest.raises(ValueError, match="lqr_regulariser"):
        pdm.velocity_fit_regulariser(6, "jerk")


@pytest.mark.slow
def test_regenerated_slice_matches_committed_fixture():
    """Where navsim-real is set up: re-export 12 scenes and re-run the real scorer; both must equal the fixture."""
    sys.path.insert(0, FIXTURE)
    try:
        import make_fixture
    finally:
        sys.path.remove(FIXTURE)
    if not make_fixture.tool_available():
        pytest.skip("navsim-real is not set up (see ../shared/tools/navsim-real/README.md)")
    r = subprocess.run([sys.executable, os.path.join(FIXTURE, "make_fixture.py"), "--check", "0:12"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
