"""`config.data.vl_features`: the control that shows whether a planner uses the VL memory (issue "planners that see").

'shuffled' gives each scene another scene's states (a fixed derangement, the same on every read), 'zeros' zeroes
them; status, history and the expert future stay the scene's own. Read through `load_split` from a small cache.
"""
import numpy as np
import pytest

from recogdrive_jax import configs
from recogdrive_jax.data import planner_data
from recogdrive_jax.data.hidden_cache import HiddenCache
from recogdrive_jax.sim import scene_store, world

N, L, H = 7, 5, 4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A compact cache of N scenes whose row i is filled with the value i + 1 (so a row's origin is readable)."""
    root = tmp_path_factory.mktemp("vlcache")
    scenes = world.stack_scenes(world.generate_scenes(N, seed=3, reference="expert"))
    path = root / "train"
    cache = HiddenCache.create(str(path), N, L, H)
    lengths = 2 + np.arange(N) % 3
    hidden = np.stack([np.full((L, H), i + 1.0, np.float32) for i in range(N)])
    cache.write(np.arange(N), hidden, np.arange(L)[None] < lengths[:, None])
    scene_store.save_scenes(str(path / "scenes.npz"), scenes)
    return str(root)


def _split(cache_dir, **kw):
    return planner_data.load_split(configs.planner_data_block(cache_dir=cache_dir, **kw), "train", H)


def test_real_shuffled_zeros(cache_dir):
    idx = np.arange(N)
    real = _split(cache_dir).cond(idx)
    assert np.array_equal(real["vl_states"][:, 0, 0], idx + 1.0)

    shuf = _split(cache_dir, vl_features="shuffled").cond(idx)
    src = shuf["vl_states"][:, 0, 0].astype(int) - 1  # which scene's states each scene got
    assert sorted(src) == list(idx) and (src != idx).all()  # a permutation with no scene keeping its own
    assert np.array_equal(shuf["vl_mask"], real["vl_mask"][src])  # the mask travels with the states
    for key in ("status", "history"):
        assert np.array_equal(shuf[key], real[key])  # the scene's own
    again = _split(cache_dir, vl_features="shuffled").cond(idx[::-1])  # fixed: the same on a new load, any order
    assert np.array_equal(again["vl_states"][::-1], shuf["vl_states"])
    other = _split(cache_dir, vl_features="shuffled", vl_shuffle_seed=1).cond(idx)
    assert not np.array_equal(other["vl_states"], shuf["vl_states"])

    zeros = _split(cache_dir, vl_features="zeros").batch(idx)
    assert not zeros["cond"]["vl_states"].any()
    assert np.array_equal(zeros["cond"]["vl_mask"], real["vl_mask"])
    assert np.array_equal(zeros["cond"]["status"], real["status"])


@pytest.mark.parametrize("features", ["real", "shuffled", "zeros"])
def test_in_memory_cache_gives_the_same_batches(cache_dir, features):
    """data.vl_in_memory reads the split once (stored dtype) and gathers from memory: bitwise the same batches."""
    idx = np.array([5, 0, 3, 3, 6])
    per_read = _split(cache_dir, vl_features=features).batch(idx)
    held = _split(cache_dir, vl_features=features, vl_in_memory=True)
    assert held.vl_states is not None and held.vl_states.dtype == held.cache.stored_dtype
    got = held.batch(idx)
    for key in ("vl_states", "vl_mask", "status", "history"):
        assert got["cond"][key].dtype == per_read["cond"][key].dtype
        assert np.array_equal(got["cond"][key], per_read["cond"][key])


def test_scene_token_split_is_shuffled_too():
    scenes = world.stack_scenes(world.generate_scenes(4, seed=3, reference="expert"))
    tokens = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    split = planner_data.PlannerSplit("eval", scenes, tokens, np.ones((4, 2), bool))
    split = planner_data._with_features(split, configs.planner_data_block(vl_features="shuffled"))
    got = split.vl(np.arange(4))[0][:, 0, 0]
    assert sorted(got) == [0, 1, 2, 3] and (got != np.arange(4)).all()


def test_unknown_value_is_an_error_naming_the_key(cache_dir):
    with pytest.raises(configs.ConfigError, match=r"config.data.vl_features: unknown 'noise'; allowed: "
                                                   r"\['real', 'shuffled', 'zeros'\]"):
        _split(cache_dir, vl_features="noise")
