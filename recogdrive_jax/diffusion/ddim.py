"""DDIM sampling and chain log-probabilities for an epsilon-predicting model (spec/planner.md §3).

Everything here is a pure function of an `eps_fn(x, t) -> eps` closure (x [B, H, A] normalised poses, t [B]
int32 DDPM timesteps), so the same code serves IL evaluation, RL rollouts and DiffGRPO log-prob recomputation.
Arrays are fp32; steps are a `lax.scan` so the network is traced once.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from recogdrive_jax.diffusion.schedule import DDIMSchedule, DDPMSchedule

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
LOG_SQRT_2PI = float(0.5 * np.log(2 * np.pi))


class DDIMStep(NamedTuple):
    mean: jax.Array  # [B, H, A]
    logvar: jax.Array  # [] or broadcastable
    x0: jax.Array  # clipped x0 prediction


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How noise is applied at each step: x_next = mu + max(std, min_std) * clip(z, +-noise_clip).

    `eta` 1 = stochastic DDIM (upstream), 0 = deterministic; `deterministic=True` also sets the step std to 0.
    """
    eta: float = 1.0
    min_std: float = 1e-4
    noise_clip: float | None = 1.0
    denoised_clip: float | None = 1.0
    eps_clip: float | None = None
    final_clip: float | None = 1.0
    deterministic: bool = False


def ddim_mean_logvar(x: jax.Array, eps: jax.Array, alpha: jax.Array, alpha_prev: jax.Array, *, eta: float,
                     denoised_clip: float | None = 1.0, eps_clip: float | None = None) -> DDIMStep:
    """One DDIM posterior: x0 = clip((x - sqrt(1-a) eps)/sqrt(a)); eps recomputed from the clipped x0;
    sigma = max(eta sqrt((1-a')/(1-a) (1-a/a')), 1e-10); mu = sqrt(a') x0 + sqrt(max(1-a'-sigma^2, 0)) eps';
    logvar = log(sigma^2 + 1e-20). alpha/alpha_prev are scalars (abar_t, abar_prev)."""
    x = x.astype(jnp.float32)
    eps = eps.astype(jnp.float32)
    sqrt_one_minus = jnp.sqrt(1.0 - alpha)
    x0 = (x - sqrt_one_minus * eps) / jnp.sqrt(alpha)
    if denoised_clip is not None:
        x0 = jnp.clip(x0, -denoised_clip, denoised_clip)
        eps = (x - jnp.sqrt(alpha) * x0) / sqrt_one_minus
    if eps_clip is not None:
        eps = jnp.clip(eps, -eps_clip, eps_clip)
    sigma = jnp.maximum(eta * jnp.sqrt((1.0 - alpha_prev) / (1.0 - alpha) * (1.0 - alpha / alpha_prev)), 1e-10)
    dir_coef = jnp.sqrt(jnp.maximum(1.0 - alpha_prev - sigma ** 2, 0.0))
    mean = jnp.sqrt(alpha_prev) * x0 + dir_coef * eps
    logvar = jnp.log(sigma ** 2 + 1e-20)
    return DDIMStep(mean, logvar, x0)


def gaussian_log_prob(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """Per-coordinate log N(x; mean, std^2) (torch.distributions.Normal.log_prob)."""
    var = std ** 2
    return -((x - mean) ** 2) / (2 * var) - jnp.log(std) - LOG_SQRT_2PI


def _step_table(ddim: DDIMSchedule) -> tuple[jax.Array, jax.Array, jax.Array]:
    return (jnp.asarray(ddim.t, jnp.int32), jnp.asarray(ddim.alphas, jnp.float32),
            jnp.asarray(ddim.alphas_prev, jnp.float32))


def ddim_sample(eps_fn: EpsFn, x_init: jax.Array, step_noise: jax.Array, ddim: DDIMSchedule,
                settings: SamplerSettings, *, logprob_min_std: float | None = None
                ) -> tuple[jax.Array, jax.Array | None]:
    """Runs K DDIM steps from x_init [B, H, A] with pre-drawn step noise [K, B, H, A].

    Returns (chain [K+1, B, H, A], log_probs [K, B, H, A] or None). chain[0] = x_init (unclipped), chain[K] = final
    sample clipped to +-final_clip. log-probs (if `logprob_min_std` is given) are of chain[k+1] under the step-k
    Gaussian with std max(exp(logvar/2), logprob_min_std), i.e. what `chain_log_prob` recomputes.
    """
    ts, alphas, alphas_prev = _step_table(ddim)
    num_steps = ddim.num_steps
    eta = 0.0 if settings.deterministic else settings.eta
    b = x_init.shape[0]

    def step(x, inputs):
        k, t, a, a_prev, z = inputs
        eps = eps_fn(x, jnp.full((b,), t, jnp.int32))
        s = ddim_mean_logvar(x, eps, a, a_prev, eta=eta, denoised_clip=settings.denoised_clip,
                             eps_clip=settings.eps_clip)
        std = jnp.exp(0.5 * s.logvar)
        if settings.deterministic:
            x_next = s.mean
        else:
            std_s = jnp.maximum(std, settings.min_std)
            zc = z if settings.noise_clip is None else jnp.clip(z, -settings.noise_clip, settings.noise_clip)
            x_next = s.mean + std_s * zc
        if settings.final_clip is not None:
            x_next = jnp.where(k == num_steps - 1, jnp.clip(x_next, -settings.final_clip, settings.final_clip),
                               x_next)
        if logprob_min_std is None:
            lp = jnp.zeros((), jnp.float32)
        else:
            lp = gaussian_log_prob(x_next, s.mean, jnp.maximum(std, logprob_min_std))
        return x_next, (x_next, lp)

    xs = (jnp.arange(num_steps), ts, alphas, alphas_prev, step_noise.astype(jnp.float32))
    _, (nexts, lps) = jax.lax.scan(step, x_init.astype(jnp.float32), xs)
    chain = jnp.concatenate([x_init.astype(jnp.float32)[None], nexts], axis=0)
    return chain, (lps if logprob_min_std is not None else None)


def chain_log_prob(eps_fn: EpsFn, chain: jax.Array, ddim: DDIMSchedule, *, min_std: float = 0.1, eta: float = 1.0,
                   denoised_clip: float | None = 1.0, eps_clip: float | None = None) -> jax.Array:
    """log N(chain[k+1]; mu(chain[k], t_k), max(sigma_k, min_std)) per coordinate; chain [K+1, B, H, A] ->
    [K, B, H, A]. Differentiable w.r.t. whatever `eps_fn` closes over (the current policy's params).

    The K steps are independent given the chain, so they run as one `vmap`ped network call over [K, B] rather than a
    sequential scan (bench/RESULTS.md, GRPO step profile): every weight gradient is one product over all K*B rows
    instead of K products summed into a parameter-sized accumulator per step, and work that does not depend on the
    step (the memory's key projection and key norms in the cross blocks) is done once, not K times."""
    ts, alphas, alphas_prev = _step_table(ddim)
    b = chain.shape[1]
    chain = chain.astype(jnp.float32)

    def step(t, a, a_prev, x, x_next):
        eps = eps_fn(x, jnp.full((b,), t, jnp.int32))
        s = ddim_mean_logvar(x, eps, a, a_prev, eta=eta, denoised_clip=denoised_clip, eps_clip=eps_clip)
        std = jnp.maximum(jnp.exp(0.5 * s.logvar), min_std)
        return gaussian_log_prob(x_next, s.mean, std)

    return jax.vmap(step)(ts, alphas, alphas_prev, chain[:-1], chain[1:])


def q_sample(ddpm: DDPMSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; t [B] int."""
    sa = jnp.asarray(ddpm.sqrt_alphas_cumprod)[t]
    so = jnp.asarray(ddpm.sqrt_one_minus_alphas_cumprod)[t]
    expand = (slice(None),) + (None,) * (x0.ndim - 1)
    return sa[expand] * x0 + so[expand] * noise


def epsilon_loss(eps_fn: EpsFn, ddpm: DDPMSchedule, x0: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict]:
    """IL loss: t ~ U{0..T-1}, x_t = q_sample(x0, t, eps), MSE(eps_fn(x_t, t), eps) over all elements."""
    k_t, k_n = jax.random.split(rng)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, ddpm.num_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    x_t = q_sample(ddpm, x0.astype(jnp.float32), t, noise)
    pred = eps_fn(x_t, t).astype(jnp.float32)
    loss = jnp.mean((pred - noise) ** 2)
    return loss, {"loss": loss, "eps_mse": loss}
