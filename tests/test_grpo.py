"""DiffGRPO: advantages, discounting, log-probs, the loss pieces, the jitted update (PDM inside) and the rl stage."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from recogdrive_jax import configs
from recogdrive_jax.data import planner_data
from recogdrive_jax.models.planner import build_planner, planner_config, repeat_context
from recogdrive_jax.rl import grpo
from recogdrive_jax.train import optim
from recogdrive_jax.train.module_def import ModuleDef
from recogdrive_jax.train.state import init_train_state

B, G = 4, 4


def _np_group_adv(r):
    return (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-8)


# ---------------------------------------------------------------------------------------------------------------
# Advantages and discounting (no model).

def test_constant_rewards_give_zero_advantages_without_nan():
    r = jnp.full((3, 8), 0.7)
    for algo in grpo.ALGOS:
        adv = np.asarray(grpo.group_advantages(r, algo=algo))
        assert np.all(np.isfinite(adv)) and np.all(adv == 0.0), algo
    # one constant group next to a varied one: the constant group stays 0, the other follows the formula
    rng = np.random.default_rng(0)
    r = np.stack([np.full(8, 0.3), rng.uniform(size=8)]).astype(np.float32)
    adv = np.asarray(grpo.group_advantages(jnp.asarray(r)))
    assert np.all(adv[0] == 0.0)
    np.testing.assert_allclose(adv[1], _np_group_adv(r[1:])[0], rtol=1e-5, atol=1e-6)


def test_advantage_formulas_match_spec():
    rng = np.random.default_rng(1)
    r = rng.uniform(size=(5, 8)).astype(np.float32)
    np.testing.assert_allclose(grpo.group_advantages(jnp.asarray(r), algo="grpo"), _np_group_adv(r), rtol=1e-5,
                               atol=1e-6)
    c = r - r.mean(1, keepdims=True)  # REINFORCE++: group-mean baseline, then whole-batch normalisation
    np.testing.assert_allclose(grpo.group_advantages(jnp.asarray(r), algo="reinforce_pp"),
                               (c - c.mean()) / (c.std(ddof=1) + 1e-8), rtol=1e-5, atol=1e-6)
    a = _np_group_adv(r)
    clipped = np.clip(a, np.quantile(a, 0.1), np.quantile(a, 0.9))
    np.testing.assert_allclose(grpo.group_advantages(jnp.asarray(r), quantiles=(0.1, 0.9)), clipped, rtol=1e-5,
                               atol=1e-6)
    # upstream's (0, 1) clamp is a no-op
    np.testing.assert_array_equal(grpo.group_advantages(jnp.asarray(r), quantiles=(0.0, 1.0)),
                                  grpo.group_advantages(jnp.asarray(r)))


def test_nan_reward_left_out_of_group_statistics():
    rng = np.random.default_rng(2)
    r = rng.uniform(size=(2, 6)).astype(np.float32)
    r_nan = r.copy()
    r_nan[1, 2] = np.nan
    for algo in ("grpo", "reinforce_pp"):
        adv = np.asarray(grpo.group_advantages(jnp.asarray(r_nan), algo=algo))
        assert np.all(np.isfinite(adv)) and adv[1, 2] == 0.0
    adv = np.asarray(grpo.group_advantages(jnp.asarray(r_nan)))
    np.testing.assert_allclose(adv[1, [0, 1, 3, 4, 5]], _np_group_adv(r[1:, [0, 1, 3, 4, 5]])[0], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(adv[0], _np_group_adv(r[:1])[0], rtol=1e-5, atol=1e-6)


def test_discount_weights_and_per_coordinate_clamp():
    np.testing.assert_allclose(grpo.discount_weights(5, 0.6), [0.1296, 0.216, 0.36, 0.6, 1.0], rtol=1e-6)
    assert grpo.discount_weights(5, 0.6)[-1] == 1.0  # the last (t = 0) denoising step has weight 1
    lp = jnp.asarray([[[[-10.0, 3.0, 0.5]]]])  # [1, K=1, H=1, A=3]
    # clamp each coordinate first: mean(-5, 2, 0.5) = -0.8333 (clamping the mean, -2.1667, would be wrong)
    np.testing.assert_allclose(grpo.clamped_step_log_prob(lp), [[-2.5 / 3]], rtol=1e-6)


def test_config_validation_names_keys():
    with pytest.raises(ValueError, match="config.rl.algo"):
        grpo.GRPOConfig(algo="ppo")
    with pytest.raises(ValueError, match="config.rl: unknown key"):
        grpo.GRPOConfig.from_mapping({"bc_coef": 0.1})
    with pytest.raises(ValueError, match="config.rl.group_size"):
        grpo.GRPOConfig(group_size=1)


# ---------------------------------------------------------------------------------------------------------------
# Model-level pieces on the tiny planner.

@pytest.fixture(scope="module")
def tiny():
    pcfg = planner_config("tiny")
    mdef = ModuleDef(lambda r: build_planner(pcfg, r))
    params = mdef.init(jax.random.key(0))
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    cond = {"vl_states": jax.random.normal(k1, (B, 6, pcfg.vl_dim)), "status": jax.random.normal(k2, (B, 8)),
            "history": jax.random.normal(k3, (B, 4, 3))}

    @jax.jit
    def roll(p, rng):
        planner = mdef.bind(p)
        ctx = planner.encode(cond)
        out = planner.sample_with_chain(None, rng, ctx=repeat_context(ctx, G))
        ref = planner.sample_with_chain(None, jax.random.fold_in(rng, 1), ctx=ctx)
        return out["chain"], out["log_probs"], ref["chain"]

    chain, lps, ref_chain = roll(params, jax.random.key(2))
    return dict(pcfg=pcfg, mdef=mdef, params=params, cond=cond, chain=chain, lps=lps, ref_chain=ref_chain)


def _direct_log_prob(mdef, params, cond_rep, chain, pcfg):
    """log N(chain[k+1]; mu_k, max(sigma_k, 0.1)) written out from spec §3, in float64 numpy."""
    from recogdrive_jax.diffusion.schedule import make_ddim_schedule, make_ddpm_schedule
    ddim = make_ddim_schedule(make_ddpm_schedule(100), 5)
    planner = mdef.bind(params)
    ctx = planner.encode(cond_rep)
    chain = np.asarray(chain, np.float64)
    out = []
    for k in range(5):
        x = chain[:, k]
        eps = np.asarray(planner.predict(jnp.asarray(x, jnp.float32), jnp.full((x.shape[0],), int(ddim.t[k])), ctx),
                         np.float64)
        a, ap = float(ddim.alphas[k]), float(ddim.alphas_prev[k])
        x0 = np.clip((x - np.sqrt(1 - a) * eps) / np.sqrt(a), -1, 1)
        eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        sigma = max(np.sqrt((1 - ap) / (1 - a) * (1 - a / ap)), 1e-10)
        mu = np.sqrt(ap) * x0 + np.sqrt(max(1 - ap - sigma ** 2, 0.0)) * eps
        std = max(sigma, 0.1)
        out.append(-((chain[:, k + 1] - mu) ** 2) / (2 * std ** 2) - np.log(std) - 0.5 * np.log(2 * np.pi))
    return np.stack(out, 1)


def test_chain_log_prob_matches_direct_gaussian(tiny):
    mdef, params, cond, chain = tiny["mdef"], tiny["params"], tiny["cond"], tiny["chain"]
    cond_rep = jax.tree.map(lambda x: jnp.repeat(x, G, axis=0), cond)

    @jax.jit
    def lp(p):
        planner = mdef.bind(p)
        return planner.chain_log_prob(chain, None, ctx=repeat_context(planner.encode(cond), G))

    got = np.asarray(lp(params))
    assert got.shape == (B * G, 5, 8, 3)
    np.testing.assert_allclose(got, _direct_log_prob(mdef, params, cond_rep, chain, tiny["pcfg"]), atol=2e-4)
    # the sampler's log-probs are the same quantity
    np.testing.assert_allclose(got, np.asarray(tiny["lps"]), atol=1e-5)
    # encoding once per scene and repeating == the planner's own path on the repeated cond
    np.testing.assert_allclose(got, np.asarray(mdef.bind(params).chain_log_prob(chain, cond_rep)), atol=1e-5)


def test_group_sample_and_log_prob_equal_the_repeated_context(tiny):
    """The rollout's G-member vmap (scene context unbatched, memory keys / adaLN once per scene) is the repeated-
    context computation: same noise draws, same chains and log-probs, gradients equal at fp32 rounding."""
    mdef, cond = tiny["mdef"], tiny["cond"]
    leaves, treedef = jax.tree.flatten(tiny["params"])  # perturbed: the zero-initialised adaLN would hide the blocks
    params = jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(jax.random.key(i), x.shape)
                                          for i, x in enumerate(leaves)])

    @jax.jit
    def both(p, rng):
        planner = mdef.bind(p)
        ctx = planner.encode(cond)
        return (planner.sample_with_chain(None, rng, ctx=repeat_context(ctx, G)), grpo.group_sample(planner, ctx, rng, G))

    ref, got = both(params, jax.random.key(2))
    for k in ("chain", "log_probs", "trajectory"):
        assert got[k].shape == ref[k].shape
    np.testing.assert_allclose(np.asarray(got["chain"]), np.asarray(ref["chain"]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["log_probs"]), np.asarray(ref["log_probs"]), atol=1e-5)
    chain, w = ref["chain"], jax.random.normal(jax.random.key(3), (B * G, 5, 8, 3))

    def objective(p, grouped):
        planner = mdef.bind(p)
        ctx = planner.encode(cond)
        lp = (grpo.group_log_prob(planner, chain, ctx) if grouped
              else planner.chain_log_prob(chain, None, ctx=repeat_context(ctx, G)))
        return jnp.sum(lp * w), lp

    (va, lpa), ga = jax.jit(jax.value_and_grad(lambda p: objective(p, False), has_aux=True))(params)
    (vb, lpb), gb = jax.jit(jax.value_and_grad(lambda p: objective(p, True), has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(lpb), np.asarray(lpa), atol=1e-5)
    np.testing.assert_allclose(float(vb), float(va), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):  # fp32 sums in another order: relative to the leaf
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(b - a)) <= 1e-5 * np.max(np.abs(a))


@pytest.fixture(scope="module")
def pg_grad(tiny):
    """jit(grad) of the REINFORCE loss with BC weight 0 (the BC term still computed and logged)."""
    mdef, cond = tiny["mdef"], tiny["cond"]
    cfg = grpo.GRPOConfig(bc_weight=0.0, group_size=G)
    w = jnp.asarray(grpo.discount_weights(5, cfg.gamma))

    @jax.jit
    def fn(p, chain, adv, valid):
        return jax.grad(grpo.reinforce_loss, has_aux=True)(p, mdef.bind, cond, chain, adv, valid,
                                                          tiny["ref_chain"], cfg, w)

    @jax.jit
    def ell(p, chain):
        planner = mdef.bind(p)
        lp = planner.chain_log_prob(chain, None, ctx=repeat_context(planner.encode(cond), G))
        return grpo.clamped_step_log_prob(lp)  # [N, K]

    return fn, ell, w


def test_positive_advantage_chain_gains_log_prob(tiny, pg_grad):
    fn, ell, w = pg_grad
    params, chain = tiny["params"], tiny["chain"]
    adv = jnp.zeros((B * G,)).at[0].set(1.0)  # chain 0 has a positive advantage, every other chain 0
    grads, _ = fn(params, chain, adv, jnp.ones((B * G,), bool))
    norm = optax.global_norm(grads)
    new = jax.tree.map(lambda p, g: p - 1e-4 * g / norm, params, grads)  # one small gradient-descent step
    before, after = np.asarray(ell(params, chain)), np.asarray(ell(new, chain))
    assert (after[0] * w).sum() > (before[0] * w).sum()  # its discounted log-prob objective rose
    # with a group-normalised advantage the full update moves the same way (sign check of the loss)
    rewards = jnp.zeros((B, G)).at[0, 0].set(1.0)
    adv = grpo.group_advantages(rewards).reshape(-1)
    assert float(adv[0]) > 0 and float(adv[1]) < 0


def test_bc_weight_zero_gives_zero_bc_gradient(tiny, pg_grad):
    fn, _, _ = pg_grad
    grads, aux = fn(tiny["params"], tiny["chain"], jnp.zeros((B * G,)), jnp.ones((B * G,), bool))
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))  # zero advantage + BC weight 0
    assert np.isfinite(float(aux["bc_loss"])) and float(aux["bc_loss"]) != 0.0  # BC still reported


def test_invalid_sample_does_not_reach_the_gradient(tiny, pg_grad):
    fn, _, _ = pg_grad
    chain = tiny["chain"]
    adv = grpo.group_advantages(jax.random.uniform(jax.random.key(5), (B, G))).reshape(-1)
    valid = jnp.ones((B * G,), bool).at[3].set(False)
    adv = adv.at[3].set(0.0)
    garbage = chain.at[3].set(jnp.nan)
    g_ref, _ = fn(tiny["params"], chain, adv, valid)
    g_bad, _ = fn(tiny["params"], jnp.where(jnp.isfinite(garbage), garbage, 0.0).at[3].set(7.0), adv, valid)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_bad)):
        np.testing.assert_array_equal(a, b)


def test_clip_ratio_is_one_at_the_rollout_params(tiny):
    mdef, params, cond, chain = tiny["mdef"], tiny["params"], tiny["cond"], tiny["chain"]
    cfg = grpo.GRPOConfig(algo="grpo_clip", group_size=G)
    old = jnp.mean(grpo.clamped_step_log_prob(tiny["lps"]), -1)
    idx = jnp.arange(B * G)[::2]
    adv = jnp.ones((B * G,))
    loss, aux = jax.jit(lambda p: grpo.clip_loss(p, mdef.bind, cond, chain[idx], idx // G, old[idx], adv[idx],
                                                 jnp.ones(idx.shape, bool), tiny["ref_chain"], cfg, 0.46112))(params)
    assert abs(float(aux["ratio_mean"]) - 1.0) < 1e-5 and float(aux["ratio_max_dev"]) < 1e-5
    assert float(aux["clip_frac"]) == 0.0 and abs(float(aux["approx_kl"])) < 1e-5
    np.testing.assert_allclose(float(aux["policy_loss"]), -0.46112, rtol=1e-4)  # -mean(ratio * A * mean_k w_k)


# ---------------------------------------------------------------------------------------------------------------
# The jitted update with the PDM reward inside.

def _scene_batch(n=B):
    data_cfg = configs.planner_data_block(num_train_scenes=n, num_eval_scenes=n)
    split = planner_data.load_split(data_cfg, "train", planner_config("tiny").vl_dim)
    return next(planner_data.rl_iterator(split, n, 0))


@pytest.fixture(scope="module")
def update(tiny):
    mdef, params = tiny["mdef"], tiny["params"]
    optim_cfg = configs.base_config().optim
    tx = optim.make_optimizer(optim_cfg, 10, params)
    cfg = grpo.GRPOConfig(group_size=G)
    pdm_reward = grpo.pdm_reward_fn(cfg)

    def reward_fn(scene, traj):  # the PDM reward; a scene with kind -1 stands for a failed score (NaN)
        out = dict(pdm_reward(scene, traj))
        out["pdms"] = jnp.where((scene.kind == -1)[:, None], jnp.nan, out["pdms"])
        return out

    fn = jax.jit(grpo.make_update(mdef.bind, cfg, tx, num_denoise_steps=5, reward_fn=reward_fn,
                                  schedule=optim.make_schedule(optim_cfg, 10)))
    return fn, init_train_state(params, tx)


def test_update_same_seed_same_metrics_and_pdm_inside(tiny, update):
    fn, state = update
    batch = jax.tree.map(jnp.asarray, _scene_batch())
    s1, m1 = fn(state, batch, jax.random.key(7), tiny["params"])
    s2, m2 = fn(state, batch, jax.random.key(7), tiny["params"])
    m1, m2 = jax.device_get(m1), jax.device_get(m2)
    assert m1.keys() == m2.keys()
    for k in m1:
        np.testing.assert_array_equal(m1[k], m2[k], err_msg=k)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_array_equal(a, b)
    _, m3 = fn(state, batch, jax.random.key(8), tiny["params"])
    assert float(m3["reward_mean"]) != float(m1["reward_mean"])  # another seed, other chains
    for key in ("reward_mean", "reward_std", "policy_loss", "bc_loss", "clip_frac", "adv_mean", "adv_std",
                "nan_reward_count", "pdm/nc", "pdm/dac", "pdm/ddc", "pdm/ttc", "pdm/ep", "pdm/c", "pdm/pdms",
                "pdm/epdms", "lr", "grad_norm", "rollout/end_reverse_frac"):
        assert key in m1 and np.isfinite(m1[key]), key
    assert 0.0 <= m1["pdm/pdms"] <= 1.0 and m1["nan_reward_count"] == 0.0
    assert int(s1.step) == 1


def test_nan_reward_is_reported_and_not_trained_on(tiny, update):
    fn, state = update
    batch = _scene_batch()
    kind = np.array(batch["scene"].kind)
    kind[1] = -1  # scoring scene 1 fails: its G rewards are NaN
    batch["scene"].kind = kind
    batch = jax.tree.map(jnp.asarray, batch)
    new, m = fn(state, batch, jax.random.key(7), tiny["params"])
    m = jax.device_get(m)
    assert m["nan_reward_count"] == G and m["valid_frac"] == 1.0 - 1.0 / B
    assert np.isfinite(m["loss"]) and np.isfinite(m["reward_mean"]) and np.isfinite(m["grad_norm"])
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(new.params))


def _distance_reward(scene, traj):
    """A cheap stand-in reward (negative ADE to the expert) for tests about the update's mechanics, not PDM."""
    expert = jnp.asarray(scene.expert, jnp.float32)[:, None]
    return {"pdms": -jnp.mean(jnp.linalg.norm(traj[..., :2] - expert[..., :2], axis=-1), -1)}


def test_grpo_clip_ratio_is_one_on_the_first_inner_minibatch(tiny):
    mdef, params = tiny["mdef"], tiny["params"]
    optim_cfg = configs.base_config().optim
    cfg = grpo.GRPOConfig(algo="grpo_clip", group_size=G, ppo_epochs=2, num_minibatches=2, target_kl=0.03)
    tx = optim.make_optimizer(optim_cfg, 10 * cfg.updates_per_step, params)
    fn = jax.jit(grpo.make_update(mdef.bind, cfg, tx, num_denoise_steps=5, reward_fn=_distance_reward))
    state = init_train_state(params, tx)
    new, m = fn(state, jax.tree.map(jnp.asarray, _scene_batch()), jax.random.key(3), params)
    m = jax.device_get(m)
    assert abs(m["ratio_first"] - 1.0) < 1e-5 and m["ratio_max_dev_first"] < 1e-4 and m["clip_frac_first"] == 0.0
    assert 1 <= m["num_updates"] <= cfg.updates_per_step
    assert m["ratio_max_dev"] > 0.0  # later minibatches see moved params
    assert int(new.step) == 1
    # a target KL of ~0 stops after the first update (the first minibatch is always applied)
    cfg0 = dataclasses.replace(cfg, target_kl=1e-12)
    fn0 = jax.jit(grpo.make_update(mdef.bind, cfg0, tx, num_denoise_steps=5, reward_fn=_distance_reward))
    _, m0 = fn0(state, jax.tree.map(jnp.asarray, _scene_batch()), jax.random.key(3), params)
    assert float(m0["num_updates"]) == 1.0 and float(m0["early_stop"]) == 1.0


def _rl_stage_config(tmp_path, init_from, num_steps):
    c = configs.planner_stage_config("rl", variant="tiny")
    c.rl = ml_collections.ConfigDict(dataclasses.asdict(grpo.GRPOConfig(group_size=G)))
    c.data.num_train_scenes = 16
    c.data.num_eval_scenes = 8
    c.train.update(dict(batch_size=8, num_steps=num_steps, log_every=1, eval_every=0, checkpoint_every=2,
                        ema_decay=0.0, init_from=str(init_from), async_checkpoint=False, tensorboard=False))
    c.optim.update(dict(lr=1e-4, warmup_ratio=0.0, min_lr_ratio=0.0))
    c.eval.update(dict(batch_size=8, num_plots=2, use_ema=False))
    return c


def test_rl_stage_runs_resumes_and_eval_stage_scores_it(tmp_path):
    from recogdrive_jax.stages import eval as eval_stage
    from recogdrive_jax.stages import rl as rl_stage
    from recogdrive_jax.train import checkpoint as ckpt_lib
    from recogdrive_jax.train.metrics import read_metrics
    mdef = ModuleDef(lambda r: build_planner(planner_config("tiny"), r))
    ckpt_lib.save_params(str(tmp_path / "il_params"), mdef.init(jax.random.key(0)))
    work = tmp_path / "rl"
    rl_stage.run(_rl_stage_config(tmp_path, tmp_path / "il_params", 2), str(work))
    assert (work / "reference_params").is_dir() and (work / "eval" / "reference.json").is_file()
    out = rl_stage.run(_rl_stage_config(tmp_path, tmp_path / "il_params", 4), str(work))  # resumes at step 2
    rows = [r for r in read_metrics(str(work), "train")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward_mean", "pdm/pdms", "policy_loss", "bc_loss", "nan_reward_count", "adv_std"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert 0.0 <= out["pdms"] <= 1.0 and "reference_pdms" in out
    assert json.load(open(work / "eval" / "eval" / "metrics.json"))["num_scenes"] == 8
    # the eval stage on the RL workdir and on the baseline
    c = configs.planner_stage_config("eval", variant="tiny")
    del c["train"], c["optim"]
    c.data.num_eval_scenes = 8
    c.eval.update(dict(checkpoint=str(work), batch_size=8, num_plots=2, use_ema=False))
    res = eval_stage.run(c, str(tmp_path / "ev"))
    metrics = json.load(open(tmp_path / "ev" / "eval" / "eval" / "metrics.json"))
    assert set(metrics) == {"nc", "dac", "ddc", "ttc", "ep", "comfort", "pdms", "epdms", "ade", "fde",
                            "num_scenes", "protocol"}
    assert metrics["num_scenes"] == 8 and abs(metrics["pdms"] - res["pdms"]) < 1e-9
    assert len(list((tmp_path / "ev" / "eval" / "eval").glob("*.png"))) == 2
    assert (tmp_path / "ev" / "eval" / "eval" / "metrics.md").read_text().count("|") > 10
    c.eval.baseline = "constant_velocity"
    base = eval_stage.run(c, str(tmp_path / "cv"))
    assert base["name"] == "constant_velocity" and 0.0 <= base["pdms"] <= 1.0
