"""Planner model: configs, factory, logical axes, both kinds' interface, VL mask option, bf16, MLP head loss."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recogdrive_jax.models.layers import count_params
from recogdrive_jax.models.planner import (PlannerConfig, abstract_planner, build_planner, denormalize_pose,
                                           normalize_pose, planner_config, planner_params, repeat_context)


def _batch(cfg, b=2, length=6, seed=0):
    g = np.random.default_rng(seed)
    cond = {"vl_states": jnp.asarray(g.normal(size=(b, length, cfg.vl_dim)), jnp.float32),
            "status": jnp.asarray(g.normal(size=(b, 8)), jnp.float32),
            "history": jnp.asarray(g.normal(size=(b, 4, 3)), jnp.float32)}
    future = jnp.asarray(np.stack([np.linspace(1, 30, 8), np.linspace(0, 3, 8), np.linspace(0, .2, 8)], -1)[None]
                         .repeat(b, 0), jnp.float32)
    return {"cond": cond, "future": future}


def test_param_counts_match_spec():
    # spec §0 counts include eta.eta_logit (1 parameter), which this port does not keep.
    for variant, vlm, n in [("small", "large", 35_115_652), ("small", "small", 34_329_220),
                            ("large", "large", 525_383_172), ("large", "small", 522_237_444)]:
        assert count_params(planner_params(abstract_planner(planner_config(variant, vlm_size=vlm)))) + 1 == n


def test_config_variants_and_validation():
    assert planner_config("small").embed_dim == 384 and planner_config("large").embed_dim == 1536
    assert planner_config("small", vlm_size="small").vl_dim == 1536
    cfg = PlannerConfig.from_mapping({"variant": "tiny", "kind": "mlp"})
    assert cfg.kind == "mlp" and cfg.num_layers == 2
    with pytest.raises(ValueError, match="unknown key"):
        PlannerConfig.from_mapping({"variant": "tiny", "num_layer": 3})
    with pytest.raises(ValueError, match="kind"):
        planner_config("tiny", kind="transformer")
    with pytest.raises(ValueError, match="unknown variant"):
        planner_config("huge")


def test_logical_axes_on_params():
    m = abstract_planner(planner_config("tiny"))
    specs = jax.tree.leaves(nnx.get_partition_spec(nnx.state(m, nnx.Param)))
    names = {n for s in specs for n in s if n is not None}
    assert {"embed", "mlp", "heads", "kv", "norm"} <= names
    q = m.model.transformer_blocks[0].attn.to_q.kernel
    assert q.get_metadata()["out_sharding"] == ("embed", "heads")


@pytest.mark.parametrize("kind", ["diffusion", "mlp"])
def test_uniform_interface_trains(kind):
    cfg = planner_config("tiny", kind=kind)
    m = build_planner(cfg, nnx.Rngs(0))
    batch = _batch(cfg)
    opt = nnx.Optimizer(m, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt, batch, rng):
        (loss, metrics), g = nnx.value_and_grad(lambda m: m.loss(batch, rng), has_aux=True)(m)
        opt.update(m, g)
        return loss, metrics

    losses = [float(step(m, opt, batch, jax.random.key(i))[0]) for i in range(20)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    traj = nnx.jit(lambda m, c, r: m.sample(c, r, deterministic=True))(m, batch["cond"], jax.random.key(0))
    assert traj.shape == (2, 8, 3) and np.isfinite(np.asarray(traj)).all()


def test_diffusion_rl_interface_and_flow():
    cfg = planner_config("tiny")
    m = build_planner(cfg, nnx.Rngs(1))
    fm = build_planner(cfg.replace(sampling_method="flow"), nnx.Rngs(0))
    cond = _batch(cfg, b=3)["cond"]

    @nnx.jit
    def run(m, fm, cond):
        out = m.sample_with_chain(cond, jax.random.key(0))
        lp, g = m.chain_log_prob(out["chain"], cond), nnx.grad(
            lambda m: jnp.mean(m.chain_log_prob(out["chain"], cond)))(m)
        keys = jax.random.split(jax.random.key(1), 2)
        s = jax.vmap(lambda k: m.sample(cond, k))(keys)
        d = jax.vmap(lambda k: m.sample(cond, k, deterministic=True, x_init=jnp.zeros((3, 8, 3))))(keys)
        # G = 2 rollouts per scene from one encoder pass
        rep = m.sample_with_chain(None, jax.random.key(3), ctx=repeat_context(m.encode(cond), 2))
        lp_rep = m.chain_log_prob(rep["chain"], {k: jnp.repeat(v, 2, axis=0) for k, v in cond.items()})
        return out, lp, g, s, d, fm.sample(cond, jax.random.key(0)), rep, lp_rep

    out, lp, g, (s1, s2), (d1, d2), flow_traj, rep, lp_rep = run(m, fm, cond)
    assert rep["chain"].shape == (6, 6, 8, 3)
    np.testing.assert_allclose(lp_rep, rep["log_probs"], atol=1e-5)
    assert out["chain"].shape == (3, 6, 8, 3) and out["log_probs"].shape == (3, 5, 8, 3)
    assert float(jnp.abs(out["chain"][:, -1]).max()) <= 1.0
    np.testing.assert_allclose(out["trajectory"], denormalize_pose(out["chain"][:, -1]), rtol=1e-6, atol=1e-5)
    # chain log-prob (recomputed) equals the rollout's, and is differentiable w.r.t. the params
    np.testing.assert_allclose(lp, out["log_probs"], atol=1e-5)
    assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g)) > 0
    # the stochastic sampler differs by seed, the deterministic one does not
    assert float(jnp.abs(s1 - s2).max()) > 1e-4
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))
    assert flow_traj.shape == (3, 8, 3)
    with pytest.raises(NotImplementedError, match="flow"):
        fm.chain_log_prob(out["chain"], cond)


def test_vl_mask_option():
    cfg = planner_config("tiny", use_vl_mask=True)
    m = build_planner(cfg, nnx.Rngs(0))
    b = _batch(cfg, b=2, length=5)
    cond = dict(b["cond"])
    x, t = jnp.zeros((2, 8, 3)), jnp.array([10, 50])
    pad = jnp.concatenate([cond["vl_states"], 7.0 * jnp.ones((2, 3, cfg.vl_dim))], axis=1)
    mask = jnp.concatenate([jnp.ones((2, 5), bool), jnp.zeros((2, 3), bool)], axis=1)
    m2 = build_planner(cfg.replace(use_vl_mask=False), nnx.Rngs(0))  # upstream-compatible: mask ignored

    @nnx.jit
    def run(m, m2):
        padded = dict(cond, vl_states=pad, vl_mask=mask)
        return m.predict_noise(x, t, cond), m.predict_noise(x, t, padded), m2.predict_noise(x, t, padded)

    ref, masked, unmasked = run(m, m2)
    np.testing.assert_allclose(masked, ref, atol=1e-5)
    assert float(jnp.abs(unmasked - ref).max()) > 1e-4  # pads change the output without the mask


def test_bf16_compute_fp32_params():
    cfg = planner_config("tiny", dtype="bfloat16")
    m = build_planner(cfg, nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    batch = _batch(cfg)
    loss_fn = nnx.jit(lambda m, b, r: m.loss(b, r)[0])
    loss = loss_fn(m, batch, jax.random.key(0))
    m32 = build_planner(cfg.replace(dtype="float32"), nnx.Rngs(0))
    loss32 = loss_fn(m32, batch, jax.random.key(0))
    assert np.isfinite(float(loss)) and abs(float(loss) - float(loss32)) < 0.1 * float(loss32) + 0.05


def test_mlp_head_masked_loss_and_scaling():
    cfg = planner_config("tiny", kind="mlp", alpha_xy=2.0, beta_nav=10.0)
    m = build_planner(cfg, nnx.Rngs(0))
    batch = _batch(cfg)
    pred_n = m.forward(batch["cond"])
    assert float(jnp.abs(pred_n).max()) <= 1.0
    alpha = np.array([2.0, 2.0, 1.0], np.float32)
    np.testing.assert_allclose(m.sample(batch["cond"]), denormalize_pose(pred_n * alpha), rtol=1e-6)
    mask = np.ones((2, 8), bool)
    mask[0, 5:] = False
    fut = np.asarray(batch["future"]).copy()
    fut[0, 5:] = 1e3  # garbage where masked
    loss, met = m.loss({"cond": batch["cond"], "future": jnp.asarray(fut), "future_mask": jnp.asarray(mask)})
    tgt = normalize_pose(jnp.asarray(fut)) / alpha
    se = np.asarray((pred_n - tgt) ** 2)[np.broadcast_to(mask[..., None], (2, 8, 3))]
    np.testing.assert_allclose(float(met["L_nav"]), se.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(loss), 10.0 * se.mean(), rtol=1e-5)
    assert float(met["mask_cov"]) == pytest.approx(13 / 16)
    assert {"mse_x", "mse_y", "mse_heading", "final_epe", "hit_rate", "mse_total"} <= set(met)


def test_pose_normalisation_roundtrip():
    x = jnp.array([[-1.57, -19.68, -1.67], [65.17, 22.32, 1.86]])
    np.testing.assert_allclose(normalize_pose(x), [[-1, -1, -1], [1, 1, 1]], atol=1e-6)
    np.testing.assert_allclose(denormalize_pose(normalize_pose(x)), x, atol=1e-5)


def test_cond_validation():
    cfg = planner_config("tiny")
    m = build_planner(cfg, nnx.Rngs(0))
    cond = _batch(cfg)["cond"]
    with pytest.raises(KeyError, match="status"):
        m.sample({"vl_states": cond["vl_states"], "history": cond["history"]}, jax.random.key(0))
    with pytest.raises(ValueError, match="vl_states"):
        m.sample(dict(cond, vl_states=jnp.zeros((2, 3, 5))), jax.random.key(0))
