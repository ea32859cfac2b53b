"""OpenTrackVLA recipe (models/opentrackvla.py): token layout, TVI interleave, [ACT] last, pooling, masked MSE;
history frames from the world's past states; il_joint config validation naming the key."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recogdrive_jax import stage_configs
from recogdrive_jax.configs import ConfigError
from recogdrive_jax.models import internvl as iv
from recogdrive_jax.models import opentrackvla as otv
from recogdrive_jax.models.planner import planner_config
from recogdrive_jax.sim import render, world
from recogdrive_jax.vlm import joint

H, C, F = 2, 1, 4  # history frames, coarse and fine tokens: the tiny ViT's 56 px tile gives a 2x2 shuffled grid


@pytest.fixture(scope="module")
def model():
    cfg = iv.get_config("tiny")
    head = planner_config("tiny", kind="mlp", vl_dim=cfg.llm_config.hidden_size, alpha_xy=0.5)
    return otv.OpenTrackVLA(cfg, head, history_frames=H, coarse_tokens=C, fine_tokens=F, rngs=nnx.Rngs(0))


def test_layout_counts_and_order_with_the_seed_sizes():
    kinds, times = otv.token_layout(5, 3, 4, 64)
    assert len(kinds) == 5 + 3 * (1 + 4) + (1 + 64) + 1
    assert (kinds[:5] == otv.TEXT).all() and kinds[-1] == otv.ACT
    for t in range(3):  # TVI then 4 coarse tokens, per history frame in time order
        s = 5 + t * 5
        assert kinds[s] == otv.TVI and (kinds[s + 1:s + 5] == otv.COARSE).all() and (times[s:s + 5] == t).all()
    s = 5 + 15
    assert kinds[s] == otv.TVI and (kinds[s + 1:s + 65] == otv.FINE).all() and (times[s:s + 65] == 3).all()


def test_sequence_interleaves_tvi_and_puts_act_last(model):
    rng = np.random.default_rng(0)
    b, tt, s = 2, 5, model.vlm.cfg.force_image_size
    ids = jnp.asarray(rng.integers(10, 100, (b, tt)), jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)
    frames = jnp.asarray(rng.normal(size=(b, H + 1, s, s, 3)), jnp.float32)
    seq, smask = model.sequence(ids, mask, frames)
    kinds, times = otv.token_layout(tt, H, C, F)
    assert seq.shape[:2] == (b, len(kinds)) and smask.shape == (b, len(kinds))
    np.testing.assert_array_equal(np.asarray(smask[:, :tt]), np.asarray(mask))
    assert np.asarray(smask[:, tt:]).all()
    coarse, fine = model.frame_tokens(frames)
    tvi_t, tvi_k, act = model.tvi_time[...], model.tvi_kind[...], model.act_token[...]
    c_seen = {t: 0 for t in range(H)}
    f_seen = 0
    for pos, (k, t) in enumerate(zip(kinds, times)):
        got = np.asarray(seq[:, pos])
        if k == otv.TVI:
            want = np.broadcast_to(np.asarray(tvi_t[t] + tvi_k[0 if t < H else 1]), got.shape)
        elif k == otv.COARSE:
            want, c_seen[t] = np.asarray(coarse[:, t, c_seen[t]]), c_seen[t] + 1
        elif k == otv.FINE:
            want, f_seen = np.asarray(fine[:, f_seen]), f_seen + 1
        elif k == otv.ACT:
            want = np.broadcast_to(np.asarray(act), got.shape)
        else:
            want = np.asarray(model.vlm.language_model.model.embed_tokens(ids[:, pos]))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"slot {pos} kind {k}")
    assert kinds[-1] == otv.ACT and f_seen == F and all(v == C for v in c_seen.values())


def test_pool_grid_averages_blocks():
    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 16, 1)  # 4x4 grid
    np.testing.assert_allclose(np.asarray(otv._pool_grid(x, 4))[0, :, 0], [2.5, 4.5, 10.5, 12.5])
    with pytest.raises(ValueError, match="cannot pool"):
        otv._pool_grid(x, 9)


def test_masked_mse_ignores_invalid_waypoints(model):
    head = model.head
    h = jnp.asarray(np.random.default_rng(1).normal(size=(2, 1, model.head.cfg.vl_dim)), jnp.float32)
    fut = np.tile(np.linspace(0.5, 8.0, 8)[None, :, None], (2, 1, 3)).astype(np.float32)
    mask = np.ones((2, 8), bool)
    mask[0, 5:] = False
    loss = lambda f: float(head.loss({"cond": {"vl_states": h}, "future": f, "future_mask": mask})[0])  # noqa: E731
    base = loss(fut)
    moved_invalid = fut.copy()
    moved_invalid[0, 6] += 50.0
    moved_valid = fut.copy()
    moved_valid[0, 2] += 5.0
    assert loss(moved_invalid) == pytest.approx(base, rel=1e-6)
    assert loss(moved_valid) > base + 1e-3
    # beta_nav x the mean over valid coordinates only
    _, m = head.loss({"cond": {"vl_states": h}, "future": fut, "future_mask": mask})
    assert float(m["loss"]) == pytest.approx(head.cfg.beta_nav * float(m["L_nav"]), rel=1e-6)
    assert float(m["mask_cov"]) == pytest.approx(13 / 16)


def test_alpha_from_data_is_the_95th_percentile():
    rng = np.random.default_rng(0)
    expert = rng.normal(size=(200, 8, 3)).astype(np.float32) * 5
    a = joint.alpha_from_data(expert)
    n = np.abs(2.0 * (expert[..., :2] - np.array([-1.57, -19.68])) / np.array([66.74, 42.0]) - 1.0)
    assert a == pytest.approx(float(np.percentile(n, 95)), rel=1e-5)


def test_history_frames_come_from_past_states():
    scene = world.generate_scenes(1, seed=3, reference="expert")[0]
    same = world.past_scene(scene, world.NUM_HISTORY - 1)
    for k in ("lanes", "drivable", "obj_boxes", "centerline"):
        np.testing.assert_allclose(getattr(same, k), getattr(scene, k), atol=1e-5)
    past = world.past_scene(scene, 0)  # 1.5 s ago: static objects are further ahead when the ego was behind
    static = (scene.obj_type == world.OBJ_CONE) | (scene.obj_type == world.OBJ_BARRIER) | (scene.obj_type == world.OBJ_PARKED)
    if static.any() and np.hypot(*scene.history[0, :2]) > 0.5:
        d = np.hypot(*(past.obj_boxes[0, static, :2] - scene.obj_boxes[0, static, :2]).T)
        assert np.all(d > 0.4)
    frames = render.render_frames(scene, 2, 32, 56)
    assert frames.shape == (3, 32, 56, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[-1], render.render_front(scene, 32, 56))
    with pytest.raises(ValueError, match="past poses"):
        render.render_frames(scene, world.NUM_HISTORY, 32, 56)


@pytest.mark.parametrize("key,value,match", [
    ("joint.head", "gpt", "config.joint.head"),
    ("joint.train_llm", "some", "config.joint.train_llm"),
    ("joint.fine_tokens", 60, "config.joint.fine_tokens"),
    ("joint.history_frames", 7, "config.joint.history_frames"),
    ("joint.alpha_xy", 0.0, "config.joint.alpha_xy"),
    ("prompt.ego_status_text", "auto", "config.prompt.ego_status_text"),
])
def test_config_errors_name_the_key(key, value, match):
    c = stage_configs.il_joint_stage_config()
    block, name = key.split(".")
    c[block][name] = value
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        joint.validate(c)


def test_lm_loss_with_opentrackvla_is_an_error():
    c = stage_configs.il_joint_stage_config()
    c.joint.head, c.joint.lm_loss_weight = "opentrackvla", 0.5
    with pytest.raises(ConfigError, match=r"config\.joint\.lm_loss_weight"):
        joint.validate(c)
