"""`data.vl_normalize` (issue 18): the cached VL states standardised per channel or whitened by the cache's train
split, in every split, the shuffled / zeroed controls exactly as the real states (the zeroed control trains bitwise
as without it)."""
import numpy as np
import pytest

from recogdrive_jax import configs
from recogdrive_jax.data import planner_data
from recogdrive_jax.data.hidden_cache import CacheError, HiddenCache
from recogdrive_jax.sim import scene_store, world

N, L, H = 6, 4, 3


def _write(path, states, lengths, seed):
    cache = HiddenCache.create(str(path), len(states), L, H)
    cache.write(np.arange(len(states)), states, np.arange(L)[None] < lengths[:, None])
    scene_store.save_scenes(str(path / "scenes.npz"),
                            world.stack_scenes(world.generate_scenes(len(states), seed=seed, reference="expert")))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """train: channel 0 ~ 10 + small scene-varying part, channel 1 = 2 x channel 0's part, channel 2 constant;
    eval: other values (its own statistics differ from train's)."""
    root = tmp_path_factory.mktemp("vlstd")
    rng = np.random.default_rng(0)
    for split, n, shift in (("train", N, 0.0), ("eval", 4, 0.5)):
        var = rng.normal(size=(n, L)).astype(np.float32) * 0.1 + shift
        states = np.stack([10.0 + var, 2.0 * var, np.full_like(var, 5.0)], axis=-1)
        _write(root / split, states, 2 + np.arange(n) % 3, seed=3)
    return str(root)


def _split(cache_dir, split="train", **kw):
    return planner_data.load_split(configs.planner_data_block(cache_dir=cache_dir, **kw), split, H)


def test_statistics_come_from_the_train_split_and_apply_to_every_split(cache_dir):
    train_cache = HiddenCache.open(f"{cache_dir}/train")
    states, mask = train_cache.read(np.arange(N))
    tok = states[mask]
    mean, std = planner_data.vl_statistics(train_cache, "standardize")
    # bf16 storage: the statistics are those of the stored values
    np.testing.assert_allclose(mean, tok.mean(0), rtol=1e-5, atol=1e-6)
    assert std[0] == pytest.approx(tok[:, 0].std(), rel=1e-5) and std[1] == pytest.approx(tok[:, 1].std(), rel=1e-5)
    assert std[2] == pytest.approx(1e-2 * np.median(tok.std(0)), rel=1e-5)  # constant channel: floored, not 0

    for split in ("train", "eval"):
        raw = _split(cache_dir, split).cond(np.arange(4))
        got = _split(cache_dir, split, vl_normalize="standardize").cond(np.arange(4))
        m = raw["vl_mask"].astype(bool)
        want = (raw["vl_states"] - mean) / std
        np.testing.assert_allclose(got["vl_states"][m], want[m], rtol=1e-5, atol=1e-5)
        assert not got["vl_states"][~m].any()  # padding stays zero
        assert np.array_equal(got["vl_mask"], raw["vl_mask"]) and np.array_equal(got["status"], raw["status"])
    train = _split(cache_dir, vl_normalize="standardize").cond(np.arange(N))
    t = train["vl_states"][train["vl_mask"].astype(bool)]
    np.testing.assert_allclose(t[:, :2].mean(0), 0.0, atol=1e-4)  # the train split itself: zero mean, unit std
    np.testing.assert_allclose(t[:, :2].std(0), 1.0, rtol=1e-4)
    ev = _split(cache_dir, "eval", vl_normalize="standardize").cond(np.arange(4))
    assert ev["vl_states"][ev["vl_mask"].astype(bool)][:, 0].mean() > 2.0  # eval's shift kept: train statistics


def test_whitening_gives_unit_covariance_and_floors_empty_directions(tmp_path):
    """One direction carries 99.9% of the variance (as the demo cache's states: 94% in one direction, the scene
    information in directions of 1e-4 of it): whitened, every direction has unit variance, and a direction of no
    variance stays (numerically) empty instead of being blown up."""
    rng = np.random.default_rng(2)
    n, h = 64, 4
    basis = np.linalg.qr(rng.normal(size=(h, h)))[0]
    z = rng.normal(size=(n, L, h)) * np.array([30.0, 2.0, 1.0, 0.0])  # the last direction: no variance
    states = (z @ basis.T + 3.0).astype(np.float32)
    cache = HiddenCache.create(str(tmp_path / "c"), n, L, h, layout="upstream_compatible")  # fp32: no bf16 noise
    cache.write(np.arange(n), states, np.ones((n, L), bool))
    mean, w = planner_data.vl_statistics(cache, "whiten")
    assert w.shape == (h, h) and np.allclose(w, w.T, atol=1e-5)
    stored, mask = cache.read(np.arange(n))
    out = planner_data.normalize_states(stored, mask, mean, w).reshape(-1, h).astype(np.float64)
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-4)
    cov = np.cov(out.T, bias=True)
    proj = basis[:, :3]  # the directions with variance: unit variance, uncorrelated
    np.testing.assert_allclose(proj.T @ cov @ proj, np.eye(3), atol=2e-3)
    assert basis[:, 3] @ cov @ basis[:, 3] < 1e-6
    sub_mean, _ = planner_data.vl_statistics(cache, "whiten", max_tokens=n * L // 4)  # every 4th token
    np.testing.assert_allclose(sub_mean, stored[mask.astype(bool)][::4].mean(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"mode='std': expected 'standardize' or 'whiten'"):
        planner_data.vl_statistics(cache, "std")


@pytest.mark.parametrize("mode", ["standardize", "whiten"])
@pytest.mark.parametrize("in_memory", [False, True])
def test_controls_get_the_same_transform(cache_dir, mode, in_memory):
    idx = np.arange(N)
    kw = dict(vl_normalize=mode, vl_in_memory=in_memory)
    real = _split(cache_dir, **kw).cond(idx)
    shuf = _split(cache_dir, vl_features="shuffled", **kw)
    got = shuf.cond(idx)
    assert np.array_equal(got["vl_states"], real["vl_states"][shuf.feature_perm])  # the same states, permuted
    zeros = _split(cache_dir, vl_features="zeros", **kw).cond(idx)
    plain_zeros = _split(cache_dir, vl_features="zeros").cond(idx)
    for key in ("vl_states", "vl_mask", "status", "history"):  # zeroed: bitwise the batches without normalising
        assert zeros[key].dtype == plain_zeros[key].dtype and np.array_equal(zeros[key], plain_zeros[key])
    per_read = _split(cache_dir, vl_normalize=mode).cond(idx)
    assert np.array_equal(real["vl_states"], per_read["vl_states"])
    assert not np.array_equal(real["vl_states"], _split(cache_dir, vl_in_memory=in_memory).cond(idx)["vl_states"])


def test_normalize_errors_name_the_key(cache_dir, tmp_path):
    with pytest.raises(configs.ConfigError, match=r"config\.data\.vl_normalize='whiten': needs a hidden-state cache"):
        planner_data.load_split(configs.planner_data_block(vl_normalize="whiten", num_eval_scenes=2), "eval", H)
    with pytest.raises(configs.ConfigError, match=r"config\.data\.vl_normalize='zca': expected one of none, "):
        _split(cache_dir, vl_normalize="zca")
    _write(tmp_path / "eval", np.ones((2, L, H), np.float32), np.array([2, 3]), seed=4)  # an eval split alone
    with pytest.raises(CacheError, match=r"config\.data\.vl_normalize: the statistics come from the cache's "
                                         r"train split: .*train is not a hidden-state cache"):
        _split(str(tmp_path), "eval", vl_normalize="standardize")
