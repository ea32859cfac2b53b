"""Generalised advantage estimation for the VLM-PPO rollout buffer (spec/virl.md §2 "GAE and advantages").

Matches RL4VLM/SFTvsRL `RolloutStorage.compute_returns(use_gae=True)`:

    delta_t = r_t + γ·V_{t+1}·m_{t+1} − V_t,   m_{t+1} = 1 − terminated_t
    A_t     = delta_t + γ·λ·m_{t+1}·A_{t+1}
    A_t    *= 1 − truncated_t                  only with `cut_at_truncation` (upstream use_proper_time_limits)
    R_t     = A_t + V_t

The shipped config has use_proper_time_limits=False, so by default a truncated episode (attempts exhausted)
bootstraps straight into the next episode's value; `cut_at_truncation=True` is the fix the spec asks to offer.
Episodes cross buffer boundaries: `values[T]` is the value of the state after the last step (`next_value`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(rewards: jax.Array, values: jax.Array, terminated: jax.Array, truncated: jax.Array | None = None, *,
        gamma: float = 0.9, lam: float = 0.95, cut_at_truncation: bool = False) -> tuple[jax.Array, jax.Array]:
    """rewards [T, ...], values [T+1, ...], terminated/truncated [T, ...] → (advantages [T, ...], returns [T, ...]).

    Pure and jittable (a reverse `lax.scan` over time); trailing dims are independent envs.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    values = jnp.asarray(values, jnp.float32)
    if values.shape[0] != rewards.shape[0] + 1:
        raise ValueError(f"values needs T+1={rewards.shape[0] + 1} entries (bootstrap value last), got "
                         f"{values.shape[0]}")
    masks = 1.0 - jnp.asarray(terminated, jnp.float32)                 # m_{t+1}
    bad = jnp.ones_like(masks) if (truncated is None or not cut_at_truncation) else \
        1.0 - jnp.asarray(truncated, jnp.float32)

    def body(carry, x):
        r, v, v_next, m, b = x
        delta = r + gamma * v_next * m - v
        adv = (delta + gamma * lam * m * carry) * b
        return adv, adv

    xs = (rewards, values[:-1], values[1:], masks, bad)
    _, adv = jax.lax.scan(body, jnp.zeros_like(rewards[0]), xs, reverse=True)
    return adv, adv + values[:-1]


def normalize_advantages(adv: jax.Array, eps: float = 1e-5) -> jax.Array:
    """(A − mean) / (std + eps) over the whole buffer, std unbiased (torch `.std()` default)."""
    adv = jnp.asarray(adv, jnp.float32)
    return (adv - adv.mean()) / (jnp.std(adv, ddof=1) + eps)
