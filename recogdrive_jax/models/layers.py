"""Generic Flax NNX layers shared by the planner and the VLM: dense with logical axes, RMSNorm, SwiGLU, timm Mlp,
attention with RoPE and q/k-norm, sinusoidal embeddings.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `norm`, `None`); the mapping to mesh axes
lives in `parallel/sharding.py`. Compute runs in `dtype` (fp32 default, bf16 for training), params stay in
`param_dtype`. Normalisations and softmax always run in fp32.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = Any
Axes = tuple[str | None, ...]

default_kernel_init = nnx.initializers.xavier_uniform()


def dense(in_features: int, out_features: int, axes: Axes, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, use_bias: bool = True, kernel_init=default_kernel_init,
          bias_init=nnx.initializers.zeros_init()) -> nnx.Linear:
    """`nnx.Linear` whose kernel [in, out] carries `axes` and whose bias [out] carries `axes[1]`."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(kernel_init, tuple(axes)),
        bias_init=nnx.with_partitioning(bias_init, (axes[1],)), rngs=rngs)


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32, weight only (no bias)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # ones init needs no randomness; kept for a uniform constructor signature.
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """Affine LayerNorm computed in fp32 (torch `nn.LayerNorm` semantics: biased variance)."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class Mlp(nnx.Module):
    """timm-style Mlp as used by ReCogDrive: fc1 -> exact (erf) GELU -> LayerNorm(hidden) -> fc2."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, *, rngs: nnx.Rngs,
                 norm_eps: float = 1e-5, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 in_axis: str | None = None, out_axis: str | None = "embed"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = dense(in_features, hidden_features, (in_axis, "mlp"), **kw)
        self.norm = LayerNorm(hidden_features, eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.fc2 = dense(hidden_features, out_features, ("mlp", out_axis), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.norm(jax.nn.gelu(self.fc1(x), approximate=False)))


class SwiGLU(nnx.Module):
    """[x1 || x2] = w12(x); w3(silu(x1) * x2)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, use_bias: bool = True):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias)
        self.w12 = dense(dim, 2 * hidden, ("embed", "mlp"), **kw)
        self.w3 = dense(hidden, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x1, x2 = jnp.split(self.w12(x), 2, axis=-1)
        return self.w3(jax.nn.silu(x1) * x2)


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding (rotate-half / NeoX layout).

def rope_inv_freq(head_dim: int, base: float = 1e4) -> np.ndarray:
    """theta_j = base^(-2j/head_dim), j < head_dim/2, as fp32 (the `inv_freq` buffer of torch rotary embedders)."""
    return (1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))).astype(
        np.float32)


def rope_cos_sin(positions: jax.Array, head_dim: int, base: float = 1e4) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [T, head_dim] for angles p * [theta || theta]."""
    inv = jnp.asarray(rope_inv_freq(head_dim, base))
    freqs = positions.astype(jnp.float32)[:, None] * inv[None, :]  # [T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [T, hd]
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, H, T, hd]; cos/sin [T, hd]. Computed in fp32, returned in x.dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head attention (diffusers naming: to_q/to_k/to_v/to_out) with per-head RMSNorm on q and k, then RoPE.

    RoPE is applied to q always and to k only in self-attention (`context is None`): cross-attention keys (the VL
    memory) carry no positions. Scale 1/sqrt(head_dim); an optional key mask [B, S] (True = attend).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs, context_dim: int | None = None,
                 use_bias: bool = True, qk_norm: bool = True, norm_eps: float = 1e-6, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        inner = num_heads * head_dim
        context_dim = dim if context_dim is None else context_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias)
        self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
        self.to_q = dense(dim, inner, ("embed", "heads"), **kw)
        self.to_k = dense(context_dim, inner, ("embed", "kv"), **kw)
        self.to_v = dense(context_dim, inner, ("embed", "kv"), **kw)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = RMSNorm(head_dim, eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None
        self.to_out = dense(inner, dim, ("heads", "embed"), **kw)

    def _split_heads(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)  # [B, H, T, hd]

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
                 rope: tuple[jax.Array, jax.Array] | None = None, mask: jax.Array | None = None) -> jax.Array:
        """x [B, T, dim]; context [B, S, context_dim] or None (self-attention); mask [B, S] bool or None."""
        is_self = context is None
        ctx = x if is_self else context
        q = self._split_heads(self.to_q(x))  # [B, H, T, hd]
        k = self._split_heads(self.to_k(ctx))  # [B, H, S, hd]
        v = self._split_heads(self.to_v(ctx))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q = apply_rope(q, cos, sin)
            if is_self:
                k = apply_rope(k, cos, sin)
        logits = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32)
        logits = logits / math.sqrt(self.head_dim)
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = jnp.einsum("bhts,bhsd->bhtd", probs, v)  # [B, H, T, hd]
        b, _, t, _ = o.shape
        return self.to_out(o.transpose(0, 2, 1, 3).reshape(b, t, self.num_heads * self.head_dim))


# ---------------------------------------------------------------------------------------------------------------
# Sinusoidal embeddings.

def sinusoidal_embedding(t: jax.Array, dim: int, *, max_period: float = 1e4, flip_sin_to_cos: bool = False,
                         downscale_freq_shift: float = 0.0) -> jax.Array:
    """diffusers `get_timestep_embedding`: freqs_j = exp(-ln(max_period) * j / (dim/2 - shift)), j < dim/2;
    returns [sin || cos] (or [cos || sin] when flipped), shape t.shape + (dim,), fp32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = t.astype(jnp.float32)[..., None] * jnp.exp(exponent)
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[..., half:], emb[..., :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
    return emb


class TimestepEmbedding(nnx.Module):
    """diffusers `TimestepEmbedding`: linear_2(SiLU(linear_1(tau)))."""

    def __init__(self, in_dim: int, dim: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nnx.initializers.normal(0.02))
        self.linear_1 = dense(in_dim, dim, (None, "embed"), **kw)
        self.linear_2 = dense(dim, dim, ("embed", "embed"), **kw)

    def __call__(self, tau: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(tau)))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation x * (1 + scale) + shift; shift/scale [B, D] broadcast over tokens."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def to_dtype(name: str | Dtype) -> Dtype:
    """'float32' | 'bfloat16' | 'float16' | a dtype -> jnp dtype; raises on anything else."""
    if not isinstance(name, str):
        return jnp.dtype(name)
    table = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
             "float16": jnp.float16, "fp16": jnp.float16}
    if name not in table:
        raise ValueError(f"dtype: unknown dtype {name!r}; expected one of {sorted(table)}")
    return table[name]


def count_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


__all__: Sequence[str] = [
    "dense", "RMSNorm", "LayerNorm", "Mlp", "SwiGLU", "Attention", "rope_inv_freq", "rope_cos_sin", "rotate_half",
    "apply_rope", "sinusoidal_embedding", "TimestepEmbedding", "modulate", "to_dtype", "count_params",
]
