"""Diffusion machinery: schedule vs closed form and spec values, DDIM determinism, log-probs vs a direct Gaussian,
flow matching on a 1-D toy, EMA."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recogdrive_jax.diffusion import (SamplerSettings, chain_log_prob, ddim_mean_logvar, ddim_sample, ema_init,
                                      ema_update, flow_loss, flow_sample, gaussian_log_prob, make_ddim_schedule,
                                      make_ddpm_schedule, q_sample, schedule_buffers)


def test_cosine_schedule_closed_form_and_spec_values():
    ddpm = make_ddpm_schedule(100)
    # closed form in float64: abar(x) = cos^2(((x/101)+0.008)/1.008 * pi/2), x = linspace(0, 101, 101)
    x = np.linspace(0, 101, 101)
    f = np.cos(((x / 101) + 0.008) / 1.008 * math.pi / 2) ** 2
    f = f / f[0]
    beta = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
    np.testing.assert_allclose(ddpm.betas, beta, rtol=1e-6)
    np.testing.assert_allclose(ddpm.alphas_cumprod, np.cumprod(1 - beta), rtol=2e-6, atol=1e-9)  # fp32 vs fp64
    assert ddpm.betas.dtype == np.float32 and ddpm.betas.shape == (100,)
    np.testing.assert_allclose(ddpm.betas[0], 6.313e-4, rtol=1e-3)
    assert ddpm.betas[99] == np.float32(0.999)
    np.testing.assert_allclose(ddpm.alphas_cumprod[0], 0.9993687, rtol=1e-6)
    np.testing.assert_allclose(ddpm.alphas_cumprod[99], 2.43e-7, rtol=2e-3)
    np.testing.assert_allclose(ddpm.alphas_cumprod_prev[1:], ddpm.alphas_cumprod[:-1])
    np.testing.assert_allclose(ddpm.var, ddpm.betas * (1 - ddpm.alphas_cumprod_prev) / (1 - ddpm.alphas_cumprod),
                               rtol=1e-6)
    ddim = make_ddim_schedule(ddpm, 5)
    np.testing.assert_array_equal(ddim.t, [80, 60, 40, 20, 0])
    np.testing.assert_array_equal(ddim.t_schedule, [0, 20, 40, 60, 80])
    np.testing.assert_allclose(ddim.alphas, [0.0851462, 0.3261152, 0.6325157, 0.8891031, 0.9993687], atol=2e-7)
    np.testing.assert_allclose(ddim.alphas_prev, [0.3261152, 0.6325157, 0.8891031, 0.9993687, 1.0], atol=2e-7)
    np.testing.assert_array_equal(ddim.sigmas, 0.0)
    assert len(schedule_buffers()) == 19
    # eta = 1 sigmas from the spec
    sig = [float(ddim_mean_logvar(jnp.zeros(1), jnp.zeros(1), a, ap, eta=1.0).logvar) for a, ap in
           zip(ddim.alphas, ddim.alphas_prev)]
    np.testing.assert_allclose(np.exp(0.5 * np.array(sig))[:4], [0.73775, 0.51397, 0.29511, 0.025061], rtol=2e-4)
    assert np.exp(0.5 * sig[4]) == pytest.approx(math.sqrt(2e-20), rel=1e-3)  # log(sigma^2 + 1e-20), sigma = 1e-10


def _toy_eps_fn(x, t):
    # a smooth fake network: depends on x and t
    return jnp.tanh(0.7 * x + 0.01 * t[:, None, None].astype(jnp.float32))


def test_ddim_deterministic_with_zero_noise():
    ddim = make_ddim_schedule(make_ddpm_schedule(), 5)
    x0 = jax.random.normal(jax.random.key(0), (4, 8, 3))
    z1 = jax.random.normal(jax.random.key(1), (5, 4, 8, 3))
    z2 = jax.random.normal(jax.random.key(2), (5, 4, 8, 3))
    det = SamplerSettings(deterministic=True)
    c1, _ = ddim_sample(_toy_eps_fn, x0, z1, ddim, det)
    c2, _ = ddim_sample(_toy_eps_fn, x0, z2, ddim, det)
    np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))  # noise is ignored
    # stochastic sampler with all-zero step noise is also deterministic and equals x_{k+1} = mu_k
    c3, _ = ddim_sample(_toy_eps_fn, x0, jnp.zeros_like(z1), ddim, SamplerSettings())
    c4, _ = ddim_sample(_toy_eps_fn, x0, jnp.zeros_like(z1), ddim, SamplerSettings())
    np.testing.assert_array_equal(np.asarray(c3), np.asarray(c4))
    x = x0
    for k in range(5):
        s = ddim_mean_logvar(x, _toy_eps_fn(x, jnp.full((4,), ddim.t[k])), ddim.alphas[k], ddim.alphas_prev[k],
                             eta=1.0)
        x = s.mean if k < 4 else jnp.clip(s.mean, -1, 1)
        np.testing.assert_allclose(np.asarray(c3[k + 1]), np.asarray(x), atol=1e-6)
    assert float(jnp.abs(c1[-1]).max()) <= 1.0


def test_chain_log_prob_equals_direct_gaussian():
    ddim = make_ddim_schedule(make_ddpm_schedule(), 5)
    x0 = jax.random.normal(jax.random.key(3), (3, 8, 3))
    z = jax.random.normal(jax.random.key(4), (5, 3, 8, 3))
    chain, lps = ddim_sample(_toy_eps_fn, x0, z, ddim, SamplerSettings(min_std=0.04, noise_clip=5.0),
                             logprob_min_std=0.1)
    lp = chain_log_prob(_toy_eps_fn, chain, ddim, min_std=0.1)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(lps), atol=1e-6)
    # direct float64 computation
    c = np.asarray(chain, np.float64)
    for k in range(5):
        a, ap = float(ddim.alphas[k]), float(ddim.alphas_prev[k])
        x = c[k]
        eps = np.tanh(0.7 * x + 0.01 * float(ddim.t[k]))
        x0h = np.clip((x - np.sqrt(1 - a) * eps) / np.sqrt(a), -1, 1)
        eps = (x - np.sqrt(a) * x0h) / np.sqrt(1 - a)
        sigma = max(np.sqrt((1 - ap) / (1 - a) * (1 - a / ap)), 1e-10)
        mu = np.sqrt(ap) * x0h + np.sqrt(max(1 - ap - sigma ** 2, 0)) * eps
        std = max(sigma, 0.1)
        ref = -((c[k + 1] - mu) ** 2) / (2 * std ** 2) - np.log(std) - 0.5 * np.log(2 * np.pi)
        np.testing.assert_allclose(np.asarray(lp[k]), ref, atol=2e-5, rtol=1e-5)
    assert np.asarray(gaussian_log_prob(jnp.zeros(()), jnp.zeros(()), jnp.ones(()))) == pytest.approx(
        -0.5 * np.log(2 * np.pi), rel=1e-6)


def test_q_sample():
    ddpm = make_ddpm_schedule()
    x0 = jnp.ones((2, 8, 3))
    eps = jnp.full((2, 8, 3), 2.0)
    xt = q_sample(ddpm, x0, jnp.array([0, 99]), eps)
    np.testing.assert_allclose(xt[0], ddpm.sqrt_alphas_cumprod[0] + 2 * ddpm.sqrt_one_minus_alphas_cumprod[0],
                               rtol=1e-6)
    np.testing.assert_allclose(xt[1], ddpm.sqrt_alphas_cumprod[99] + 2 * ddpm.sqrt_one_minus_alphas_cumprod[99],
                               rtol=1e-6)


class _VelNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(2, 64, rngs=rngs)
        self.l2 = nnx.Linear(64, 64, rngs=rngs)
        self.l3 = nnx.Linear(64, 1, rngs=rngs)

    def __call__(self, x, bucket):  # x [B, 1, 1]
        h = jnp.concatenate([x[:, :, 0], bucket[:, None].astype(jnp.float32) / 1000.0], axis=-1)
        return self.l3(jax.nn.silu(self.l2(jax.nn.silu(self.l1(h)))))[:, :, None]


def test_flow_matching_trains_1d_toy():
    net = _VelNet(nnx.Rngs(0))
    opt = nnx.Optimizer(net, optax.adam(3e-3), wrt=nnx.Param)
    target = 0.5
    x0 = jnp.full((256, 1, 1), target)

    @nnx.jit
    def step(net, opt, rng):
        loss, g = nnx.value_and_grad(lambda n: flow_loss(n, x0, rng)[0])(net)
        opt.update(net, g)
        return loss

    first = None
    for i in range(400):
        loss = float(step(net, opt, jax.random.key(i)))
        first = loss if first is None else first
    # evaluate on fresh draws
    eval_loss = float(np.mean([float(flow_loss(net, x0, jax.random.key(10_000 + i))[0]) for i in range(4)]))
    assert eval_loss < 0.1 * first, (first, eval_loss)
    chain = flow_sample(net, jax.random.normal(jax.random.key(7), (64, 1, 1)), num_steps=5)
    assert chain.shape == (6, 64, 1, 1)
    assert float(jnp.abs(chain[-1] - target).mean()) < 0.05


def test_ema_update_pure():
    params = {"a": jnp.ones(3), "b": {"c": jnp.zeros((2, 2))}}
    ema = ema_init(params)
    new = jax.tree.map(lambda x: x + 1.0, params)
    out = ema_update(ema, new, 0.9)
    np.testing.assert_allclose(out["a"], 0.9 * 1 + 0.1 * 2)
    np.testing.assert_allclose(out["b"]["c"], 0.1)
    np.testing.assert_allclose(ema["a"], 1.0)  # inputs untouched
    out_j = jax.jit(ema_update)(ema, new, 0.999)
    np.testing.assert_allclose(out_j["a"], 0.999 + 0.002, rtol=1e-6)
