"""Value head for VLM-PPO (spec/virl.md §2 "Value"): V = MLP(h_L[P−1]).

`Linear(D, 1024) – ReLU – Linear(1024, 512) – ReLU – Linear(512, 1)` on the final (post-norm) hidden state of
the **last prompt token**, PyTorch default init (weights and biases U(±1/√fan_in)). The trunk is the shared
policy LLM; this module only sees its hidden states.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# PyTorch nn.Linear default: kaiming_uniform(a=√5) → U(±1/√fan_in) for the weight.
_torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class ValueHead(nnx.Module):
    """hidden [B, L, D] + last-prompt-token index [B] → values [B] (static shapes, gather by index)."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (1024, 512), *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        dims = [in_features, *hidden, 1]
        # Logical axes: first kernel [embed, mlp]; the later ones are small and kept unsharded after 'mlp'.
        axes = [("embed", "mlp")] + [("mlp", None)] + [(None, None)] * (len(dims) - 3)
        bias_axes = [("mlp",)] + [(None,)] * (len(dims) - 2)
        self.layers = nnx.List([
            nnx.Linear(dims[i], dims[i + 1], dtype=dtype, param_dtype=param_dtype,
                       kernel_init=nnx.with_partitioning(_torch_kernel_init, axes[i]),
                       bias_init=nnx.with_partitioning(_torch_bias_init(dims[i]), bias_axes[i]), rngs=rngs)
            for i in range(len(dims) - 1)])

    def from_hidden(self, h: jax.Array) -> jax.Array:
        """h [B, D] → values [B] (fp32)."""
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = jax.nn.relu(h)
        return h[..., 0].astype(jnp.float32)

    def __call__(self, hidden: jax.Array, last_prompt_index: jax.Array) -> jax.Array:
        """hidden [B, L, D] (final post-norm LLM states), last_prompt_index [B] = P−1 → values [B]."""
        idx = jnp.asarray(last_prompt_index, jnp.int32)[:, None, None]             # [B, 1, 1]
        h = jnp.take_along_axis(hidden, idx, axis=1)[:, 0]                          # [B, D]
        return self.from_hidden(h)


def last_prompt_index(prompt_lengths: jax.Array) -> jax.Array:
    """[B] prompt lengths P (right-padded batches, prompt starting at 0) → [B] index P−1 of the value token.
    With left padding to a common prompt length Lp, pass Lp−1 for every row instead."""
    return jnp.asarray(prompt_lengths, jnp.int32) - 1
