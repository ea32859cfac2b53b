"""TrainState and the generic jitted update built from a stage's loss function."""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

# (params, batch, rng) -> (scalar loss, {name: scalar}).
LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position: fp32 params are also the master copy."""
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None


def init_train_state(params, tx: optax.GradientTransformation, ema: bool = False) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(jnp.copy, params) if ema else None)


def split_microbatches(batch, num: int):
    """[B, ...] → [num, B/num, ...] taking every num-th row, so each micro-batch spans every data shard."""
    def one(x):
        if x.shape[0] % num:
            raise ValueError(f"batch dimension {x.shape[0]} is not divisible by config.optim.grad_accum={num}")
        return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
    return jax.tree.map(one, batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, grad_accum: int = 1,
                    ema_decay: float = 0.0, schedule: optax.Schedule | None = None):
    """Returns the pure update `(state, batch, rng) -> (state, metrics)`; the caller jits it with shardings."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def compute_grads(params, batch, rng):
        if grad_accum == 1:
            (loss, metrics), grads = grad_fn(params, batch, rng)
            return loss, metrics, grads
        micro = split_microbatches(batch, grad_accum)

        def body(carry, xs):
            i, mb = xs
            (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
            acc = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
            return acc, None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, jax.tree.map(
            lambda x: x[0], micro), rng)))
        (loss, metrics), grads = zeros
        (loss, metrics, grads), _ = jax.lax.scan(body, (loss, metrics, grads),
                                                  (jnp.arange(grad_accum), micro))
        scale = 1.0 / grad_accum
        return loss * scale, jax.tree.map(lambda m: m * scale, metrics), jax.tree.map(lambda g: g * scale, grads)

    def step(state: TrainState, batch, rng):
        loss, metrics, grads = compute_grads(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = optax.incremental_update(params, ema, step_size=1.0 - ema_decay)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params))
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

    return step
