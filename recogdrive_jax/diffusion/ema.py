"""Exponential moving average of parameters as a pure function on pytrees (upstream: decay 0.999 every step)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def ema_update(ema_params: Any, params: Any, decay: float | jax.Array = 0.999) -> Any:
    """ema <- decay * ema + (1 - decay) * params, leaf-wise, in the ema leaves' dtype."""
    def upd(e, p):
        return (decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype)
    return jax.tree.map(upd, ema_params, params)


def ema_init(params: Any) -> Any:
    """A copy of params to start the average from (upstream starts the EMA at the initial weights)."""
    return jax.tree.map(lambda p: jnp.array(p, copy=True), params)
