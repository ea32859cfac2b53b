"""Trajectory Grain pipeline: sample contents, sharding, resume exactness, PDM on a batch."""
import grain.python as gp
import numpy as np

from recogdrive_jax.data import trajectory
from recogdrive_jax.sim import pdm, scene_store, world


def _scenes(n=10):
    return world.generate_scenes(n, seed=4)


def test_sample_layout_and_pdm_on_batch(tmp_path):
    path = scene_store.save_scenes(str(tmp_path / "split.npz"), _scenes())
    ds = trajectory.trajectory_dataset(path, batch_size=4, seed=0)
    batch = next(iter(ds))
    assert batch["history"].shape == (4, 4, 3) and batch["status"].shape == (4, 8)
    assert batch["future"].shape == (4, 8, 3) and batch["index"].dtype == np.int64
    np.testing.assert_array_equal(batch["status"][:, :4].sum(-1), 1.0)
    scene = trajectory.scene_from_batch(batch["scene"])
    out = pdm.pdm_score(scene, batch["future"][:, None])
    assert out["pdms"].shape == (4, 1) and float(out["pdms"].mean()) > 0.5


def test_epochs_cover_all_rows_and_shards_are_disjoint():
    scenes = _scenes()
    seen = [int(i) for b in trajectory.trajectory_dataset(scenes, 2, seed=1, num_epochs=1) for i in b["index"]]
    assert sorted(seen) == list(range(10))
    shards = []
    for k in range(2):
        opts = gp.ShardOptions(shard_index=k, shard_count=2, drop_remainder=True)
        ds = trajectory.trajectory_dataset(scenes, 1, seed=1, shard_options=opts)
        shards.append({int(b["index"][0]) for b in ds})
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 10
    two = trajectory.trajectory_dataset(scenes, 10, seed=1, num_epochs=2)
    e1, e2 = [b["index"].tolist() for b in two]
    assert sorted(e1) == sorted(e2) == list(range(10))


def test_iterator_resume_is_exact():
    scenes = _scenes()
    ds = trajectory.trajectory_dataset(scenes, 3, seed=7, num_epochs=None)
    full = iter(ds)
    expected = [next(full)["index"].tolist() for _ in range(8)]
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    resumed = iter(trajectory.trajectory_dataset(scenes, 3, seed=7, num_epochs=None))
    resumed.set_state(state)
    assert [next(resumed)["index"].tolist() for _ in range(5)] == expected[3:]
