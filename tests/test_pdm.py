"""Vectorised JAX PDM score vs the plain shapely reference, plus hand-made cases per sub-metric."""
import dataclasses

import jax
import numpy as np

import pdm_cases
import pdm_reference
from recogdrive_jax.sim import pdm, world

KEYS = ("nc", "dac", "ddc", "ttc", "ep", "c", "lk", "hc", "ddc_v2", "ttc_v2", "ep_v2")


def test_matches_reference_on_500_pairs():
    scenes, trajs, fams = pdm_cases.make_cases(50, 10, seed=3)  # every family, 500 pairs, one jitted call
    out = {k: np.asarray(v) for k, v in pdm.pdm_score(world.stack_scenes(scenes), trajs).items()}
    ref = [pdm_reference.score_many(sc, trajs[i].astype(np.float64)) for i, sc in enumerate(scenes)]
    n = trajs.shape[0] * trajs.shape[1]
    all_agree = np.ones(trajs.shape[:2], bool)
    for k in KEYS:
        r = np.array([[ref[i][j][k] for j in range(trajs.shape[1])] for i in range(len(scenes))])
        agree = np.isclose(out[k], r, atol=1e-4)
        assert agree.mean() >= 0.99, (k, np.argwhere(~agree)[:5])
        all_agree &= agree
    for k in ("pdms", "epdms"):
        r = np.array([[ref[i][j][k] for j in range(trajs.shape[1])] for i in range(len(scenes))])
        np.testing.assert_allclose(out[k][all_agree], r[all_agree], atol=1e-4)
    assert all_agree.sum() >= 0.99 * n
    # The families really exercise the metrics.
    fam = np.array(fams)
    assert (out["nc"][fam == "collide"] < 1).mean() > 0.2
    assert (out["dac"][fam == "offroad"] == 0).mean() > 0.5
    assert (out["c"][fam == "jerky"] == 0).mean() >= 0.4  # NAVSIM's regulariser fits smoother speeds than nuPlan's
    assert (out["ep"][fam == "reverse"] < 0.05).mean() > 0.5
    assert out["pdms"][fam == "expert"].mean() > 0.9


def _empty_straight(v0: float, accel: float = 0.0) -> world.Scene:
    for seed in range(200):
        sc = world.generate_scene(seed, kind="straight", reference="expert")
        if abs(float(sc.centerline[:, 1].max())) < 1e-3:
            break
    sc = dataclasses.replace(sc, obj_type=np.zeros_like(sc.obj_type), obj_valid=np.zeros_like(sc.obj_valid))
    status = sc.status.copy()
    status[4:8] = (v0, 0.0, 0.0, 0.0)
    t = np.arange(41, dtype=np.float32) * 0.1
    ref = np.stack([v0 * t + 0.5 * accel * t ** 2, 0 * t, 0 * t], -1).astype(np.float32)
    return dataclasses.replace(sc, status=status, ref_poses=ref, expert=ref[5::5])


def _with_object(sc, poses, length=4.5, width=2.0, typ=world.OBJ_VEHICLE, speed=10.0):
    boxes, valid, otype, ospeed = sc.obj_boxes.copy(), sc.obj_valid.copy(), sc.obj_type.copy(), sc.obj_speed.copy()
    boxes[:, 0, :3] = poses
    boxes[:, 0, 3:] = (length, width)
    valid[:, 0] = True
    otype[0], ospeed[0] = typ, speed
    return dataclasses.replace(sc, obj_boxes=boxes, obj_valid=valid, obj_type=otype, obj_speed=ospeed)


def _straight_plan(v, lateral=0.0):
    t = np.arange(1, 9) * 0.5
    y = lateral * (t / 4) ** 2
    h = np.arctan2(np.gradient(y, t), v)
    return np.stack([v * t, y, h], -1).astype(np.float32)


def test_hand_made_cases():
    base = _empty_straight(10.0)
    t = np.arange(world.NUM_FRAMES) * 0.1
    oncoming = np.stack([40.0 - 10.0 * t, 0 * t, np.full_like(t, np.pi)], -1)
    head_on = _with_object(base, oncoming)
    cone = _with_object(base, np.tile([25.0, 0.0, 0.0], (world.NUM_FRAMES, 1)), 0.5, 0.5, world.OBJ_CONE, 0.0)
    still = _empty_straight(0.0, accel=2.0)
    jerky_x = np.cumsum(np.array([8, 2, 8, 2, 8, 2, 8, 2], np.float32))
    jerky = np.stack([jerky_x, np.zeros(8), np.zeros(8)], -1).astype(np.float32)
    plans = np.stack([_straight_plan(10.0), _straight_plan(10.0, lateral=-25.0), np.zeros((8, 3), np.float32),
                      jerky])
    out = pdm.pdm_score(world.stack_scenes([base, head_on, cone, still]), np.stack([plans] * 4))
    out = {k: np.asarray(v) for k, v in out.items()}
    np.testing.assert_allclose(out["pdms"][0, 0], 1.0, atol=1e-6)  # perfect plan on an empty road
    assert out["ddc"][0, 0] == 1 and out["ttc"][0, 0] == 1 and out["c"][0, 0] == 1
    assert out["dac"][0, 1] == 0 and out["pdms"][0, 1] == 0  # leaving the road
    assert out["ep"][0, 2] < 0.3  # told to stop at 10 m/s: the tracker still rolls ~11 m of the reference's 40
    assert out["c"][0, 3] == 0 and out["nc"][0, 3] == 1  # jerky
    assert out["nc"][1, 0] == 0 and out["pdms"][1, 0] == 0 and out["ttc"][1, 0] == 0  # head-on collision
    assert out["nc"][2, 0] == 0.5  # at-fault collision with a static object
    assert out["ep"][3, 2] == 0 and out["progress"][3, 2] < 1e-3  # standing still, the reference drives 16 m


def test_weights_are_traced_and_vmap_works():
    scenes, trajs, _ = pdm_cases.make_cases(4, 3, seed=5)
    batch = world.stack_scenes(scenes)
    a = pdm.pdm_score(batch, trajs)
    n_compiled = pdm._pdm_score_jit._cache_size()
    b = pdm.pdm_score(batch, trajs, ep_weight=10.0)
    assert pdm._pdm_score_jit._cache_size() == n_compiled  # no recompilation for new weights
    expect = a["nc"] * a["dac"] * (10 * a["ep"] + 5 * a["ttc"] + 2 * a["c"]) / 17
    np.testing.assert_allclose(b["pdms"], expect, atol=1e-6)
    # vmap over a leading axis of scene batches, and inside an outer jit.
    two = jax.tree_util.tree_map(lambda x: np.stack([x[:2], x[2:]]), batch)
    v = jax.jit(jax.vmap(lambda s, t: pdm.pdm_score(s, t)["pdms"]))(two, trajs.reshape(2, 2, 3, 8, 3))
    np.testing.assert_allclose(np.asarray(v).reshape(4, 3), a["pdms"], atol=1e-6)


def test_box_intersection_matches_eager_for_xla_sensitive_shape():
    # Regression for an XLA:CPU fusion miscompilation with implicit broadcasting at this shape.
    rng = np.random.default_rng(0)
    B, G, T, S, A = 2, 11, 41, 4, 24
    c1 = rng.uniform(-5, 5, (B, G, T, S, 1, 2)).astype(np.float32)
    h1 = rng.uniform(-3, 3, (B, G, T, 1, 1)).astype(np.float32)
    c2 = rng.uniform(-5, 5, (B, 1, T, S, A, 2)).astype(np.float32)
    h2 = rng.uniform(-3, 3, (B, 1, T, S, A)).astype(np.float32)
    size = rng.uniform(0.5, 3, (2, B, 1, T, S, A)).astype(np.float32)
    f = lambda *a: pdm.boxes_intersect(a[0], a[1], (2.588, 1.1485), a[2], a[3], (a[4], a[5]))  # noqa: E731
    jitted = np.asarray(jax.jit(f)(c1, h1, c2, h2, size[0], size[1]))
    with jax.disable_jit():
        eager = np.asarray(f(c1, h1, c2, h2, size[0], size[1]))
    np.testing.assert_array_equal(jitted, eager)


def test_geometry_loops_match_broadcast_formulas():
    # The loop-based point-in-polygon / polyline projection against the plain broadcast formulas (float32 numpy).
    rng = np.random.default_rng(1)
    pts = rng.uniform(-6, 6, (2, 50, 2)).astype(np.float32)
    polys = rng.uniform(-5, 5, (2, 3, 7, 2)).astype(np.float32)
    polys[:, 2, 4:] = polys[:, 2, :1]  # padded tail repeating the first vertex
    a = polys[:, None]
    b = np.roll(a, -1, axis=-2)
    py, px = pts[:, :, None, None, 1], pts[:, :, None, None, 0]
    cond = (a[..., 1] > py) != (b[..., 1] > py)
    den = np.where(cond, b[..., 1] - a[..., 1], 1.0)
    xint = a[..., 0] + (py - a[..., 1]) * (b[..., 0] - a[..., 0]) / den
    expect = (cond & (px < xint)).sum(-1) % 2 == 1
    np.testing.assert_array_equal(np.asarray(jax.jit(pdm.points_in_polygons)(pts, polys)), expect)
    line = np.cumsum(rng.uniform(0.2, 1.5, (2, 30, 2)), 1).astype(np.float32)
    line[:, -5:] = line[:, -6:-5]  # padded tail (zero-length segments)
    arc, dist = jax.jit(pdm.project_on_polyline)(pts * 3 + 10, line)
    seg = np.diff(line, axis=1).astype(np.float64)
    cum = np.concatenate([np.zeros((2, 1)), np.cumsum(np.hypot(seg[..., 0], seg[..., 1]), 1)[:, :-1]], 1)
    ap = (pts * 3 + 10)[:, :, None].astype(np.float64) - line[:, None, :-1]
    s2 = (seg ** 2).sum(-1)[:, None]
    t = np.where(s2 > 0, np.clip((ap * seg[:, None]).sum(-1) / np.where(s2 > 0, s2, 1), 0, 1), 0)
    d = np.hypot(*np.moveaxis(ap - t[..., None] * seg[:, None], -1, 0))
    i = d.argmin(-1)[..., None]
    np.testing.assert_allclose(np.asarray(dist), np.take_along_axis(d, i, -1)[..., 0], rtol=1e-5, atol=1e-5)
    expect_arc = np.take_along_axis(cum[:, None] + t * np.hypot(seg[..., 0], seg[..., 1])[:, None], i, -1)[..., 0]
    np.testing.assert_allclose(np.asarray(arc), expect_arc, rtol=1e-5, atol=1e-4)
