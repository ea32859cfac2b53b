"""Synthetic world: determinism, shapes, renderers, scene store validation, CV baseline."""
import numpy as np
import pytest

from recogdrive_jax.sim import baselines, render, scene_store, world


def test_scene_determinism_and_schema():
    a, b, c = world.generate_scene(11), world.generate_scene(11), world.generate_scene(12)
    for k, (shape, dtype) in world.SCENE_SCHEMA.items():
        va, vb = getattr(a, k), getattr(b, k)
        assert va.shape == shape and va.dtype == dtype, k
        np.testing.assert_array_equal(va, vb)
    assert not np.array_equal(a.obj_boxes, c.obj_boxes) or not np.array_equal(a.lanes, c.lanes)
    kinds = {int(world.generate_scene(s).kind) for s in range(30)}
    assert kinds == {0, 1, 2}
    j = world.generate_scene(3, kind="junction")
    assert j.intersection_mask.any() and j.status[:4].sum() == 1 and j.status[:4].argmax() == j.command
    batch = world.stack_scenes([a, c])
    assert batch.obj_boxes.shape == (2, world.NUM_FRAMES, world.MAX_OBJECTS, 5)
    assert np.all(np.isfinite(batch.expert)) and np.allclose(a.ref_poses[0], 0) and np.allclose(a.history[-1], 0)


def test_renderers(tmp_path):
    for dom in world.DOMAINS:
        sc = world.generate_scene(5, domain=dom)
        img = render.render_front(sc, height=96, width=160)
        assert img.shape == (96, 160, 3) and img.dtype == np.uint8 and img.std() > 1
    bev = render.render_bev(sc, {"cv": baselines.constant_velocity_plan(sc.status)}, size=200,
                            path=str(tmp_path / "bev.png"))
    assert bev.shape == (200, 200, 3) and bev.dtype == np.uint8 and (tmp_path / "bev.png").exists()
    night, day = (render.render_front(world.generate_scene(5, domain=d), 64, 96) for d in ("night", "day"))
    assert night.mean() < day.mean()


def test_constant_velocity_plan():
    st = np.zeros(8, np.float32)
    st[4] = 4.0
    plan = baselines.constant_velocity_plan(st)
    assert plan.shape == (8, 3)
    np.testing.assert_allclose(plan[:, 0], 4.0 * 0.5 * np.arange(1, 9))
    assert baselines.constant_velocity_plan(np.zeros((3, 8))).shape == (3, 8, 3)


def test_scene_store_roundtrip_and_validation(tmp_path):
    scenes = world.generate_scenes(3, seed=1)
    p = scene_store.save_scenes(str(tmp_path / "s.npz"), scenes)
    back = scene_store.load_scenes(p)
    np.testing.assert_array_equal(back.obj_boxes, world.stack_scenes(scenes).obj_boxes)
    one = scene_store.load_scenes(scene_store.save_scenes(str(tmp_path / "one.npz"), scenes[0]))
    assert one.history.shape == (4, 3)
    fields = {k: getattr(scenes[0], k) for k in world.SCENE_SCHEMA}
    bad = dict(fields, expert=np.full((8, 3), np.nan, np.float32))
    np.savez(tmp_path / "nan.npz", __format_version__=np.array(1), **bad)
    with pytest.raises(scene_store.SceneStoreError, match=r"nan\.npz.*'expert'.*NaN"):
        scene_store.load_scenes(str(tmp_path / "nan.npz"))
    bad = dict(fields, lanes=np.zeros((3, 3, 2), np.float32))
    np.savez(tmp_path / "shape.npz", __format_version__=np.array(1), **bad)
    with pytest.raises(scene_store.SceneStoreError, match=r"shape\.npz.*'lanes'.*shape"):
        scene_store.load_scenes(str(tmp_path / "shape.npz"))
    bad = dict(fields, status=fields["status"].astype(np.float64))
    np.savez(tmp_path / "dtype.npz", __format_version__=np.array(1), **bad)
    with pytest.raises(scene_store.SceneStoreError, match=r"'status'.*dtype"):
        scene_store.load_scenes(str(tmp_path / "dtype.npz"))
    np.savez(tmp_path / "obj.npz", __format_version__=np.array(1), **dict(fields, seed=np.array([{}], object)))
    with pytest.raises(scene_store.SceneStoreError, match="'seed'"):
        scene_store.load_scenes(str(tmp_path / "obj.npz"))


def test_metric_cache_converter_requires_navsim(tmp_path):
    from recogdrive_jax.convert import navsim_metric_cache as conv

    try:
        import navsim  # noqa: F401
        pytest.skip("navsim installed")
    except ImportError:
        pass
    with pytest.raises(SystemExit, match="optional NAVSIM install"):
        conv.main([str(tmp_path), str(tmp_path / "out.npz")])


def test_scene_memo_gives_equal_independent_copies():
    """A pipeline's steps share generated scenes in-process; what one caller changes never reaches another."""
    first = world.generate_scenes(3, seed=11, reference="expert")
    more = world.generate_scenes(5, seed=11, reference="expert")  # the first 3 from the memo
    world._MEMO.clear()
    fresh = world.generate_scenes(5, seed=11, reference="expert")
    for a, b in zip(more, fresh):
        for k in world.SCENE_SCHEMA:
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)
    first[0].history[...] = 1e6
    assert world.generate_scenes(1, seed=11, reference="expert")[0].history.max() < 1e6
