"""Flow-matching variant of the planner (upstream `sampling_method='flow'`, not shipped; spec/planner.md §3).

Training: s ~ Beta(1.5, 1), t = (0.999 - s)/0.999, x_t = (1-t) noise + t x0, target x0 - noise, the network sees
floor(1000 t). Inference: K Euler steps of dt = 1/K at buckets floor(1000 k/K). There is no log-prob (no RL).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

VelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, H, A], t_bucket [B] int32) -> velocity


def flow_loss(vel_fn: VelFn, x0: jax.Array, rng: jax.Array, *, beta_a: float = 1.5, beta_b: float = 1.0,
              num_buckets: int = 1000) -> tuple[jax.Array, dict]:
    k_s, k_n = jax.random.split(rng)
    b = x0.shape[0]
    s = jax.random.beta(k_s, beta_a, beta_b, (b,), jnp.float32)
    t = (0.999 - s) / 0.999
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    expand = (slice(None),) + (None,) * (x0.ndim - 1)
    x_t = (1.0 - t)[expand] * noise + t[expand] * x0.astype(jnp.float32)
    target = x0 - noise
    bucket = jnp.floor(t * num_buckets).astype(jnp.int32)
    pred = vel_fn(x_t, bucket).astype(jnp.float32)
    loss = jnp.mean((pred - target) ** 2)
    return loss, {"loss": loss, "flow_mse": loss}


def flow_sample(vel_fn: VelFn, x_init: jax.Array, *, num_steps: int = 5, num_buckets: int = 1000,
                final_clip: float | None = 1.0) -> jax.Array:
    """Euler integration from noise (t = 0) to data (t = 1); returns chain [K+1, B, H, A]."""
    b = x_init.shape[0]
    dt = 1.0 / num_steps

    def step(x, k):
        bucket = jnp.full((b,), jnp.floor(k * dt * num_buckets).astype(jnp.int32))
        x = x + dt * vel_fn(x, bucket).astype(jnp.float32)
        return x, x

    _, xs = jax.lax.scan(step, x_init.astype(jnp.float32), jnp.arange(num_steps, dtype=jnp.float32))
    if final_clip is not None:
        xs = xs.at[-1].set(jnp.clip(xs[-1], -final_clip, final_clip))
    return jnp.concatenate([x_init.astype(jnp.float32)[None], xs], axis=0)
