"""LightningDiT as used by the ReCogDrive planner (spec/planner.md §2 step 6-8).

Blocks alternate self-attention (even index) and cross-attention to the VL memory (odd index) when
`interleave` is on (upstream default; without it every block cross-attends); every block is adaLN-zero modulated by
c = temb(t) + e (ego embedding), has per-head RMSNorm on q/k, RoPE at query positions 0..T-1 (keys rotated only in
self-attention) and a SwiGLU FFN with hidden width D. Attribute names mirror the upstream torch modules so checkpoint
conversion is a mechanical rename. Every RMSNorm casts before scaling, as upstream's blocks/rmsnorm.py does
(`_norm(x.float()).type_as(x) * weight`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from recogdrive_jax.models.layers import (Attention, Dtype, RMSNorm, SwiGLU, TimestepEmbedding, dense, modulate,
                                          rope_cos_sin, sinusoidal_embedding)

TIMESTEP_CHANNELS = 256  # diffusers Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)


class TimestepEncoder(nnx.Module):
    """tau = [cos(t nu) || sin(t nu)], nu_j = exp(-ln(1e4) j / 127); temb = linear_2(SiLU(linear_1(tau)))."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        self.dtype = dtype
        self.timestep_embedder = TimestepEmbedding(TIMESTEP_CHANNELS, dim, rngs=rngs, dtype=dtype,
                                                   param_dtype=param_dtype)

    def __call__(self, t: jax.Array) -> jax.Array:
        tau = sinusoidal_embedding(t, TIMESTEP_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=1.0)
        return self.timestep_embedder(tau.astype(self.dtype))  # [B, D]


class DiTBlock(nnx.Module):
    """adaLN-zero block: u += gate_a * attn(mod(RMS(u))); u += gate_f * ffn(mod(RMS(u)))."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, cross_attention: bool, rngs: nnx.Rngs,
                 ffn_hidden: int | None = None, attention_bias: bool = True, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.cross_attention = cross_attention
        self.norm1 = RMSNorm(dim, order="cast_then_scale", eps=1e-6, **kw)
        # cross_attention_dim = inner_dim upstream: the memory is already projected to D.
        self.attn = Attention(dim, num_heads, head_dim, context_dim=dim, use_bias=attention_bias, rngs=rngs, **kw)
        self.norm2 = RMSNorm(dim, order="cast_then_scale", eps=1e-6, **kw)
        self.ffn = SwiGLU(dim, dim if ffn_hidden is None else ffn_hidden, rngs=rngs, **kw)
        self.adaLN_modulation = dense(dim, 6 * dim, ("embed", "mlp"), rngs=rngs,
                                      kernel_init=nnx.initializers.zeros_init(), **kw)

    def __call__(self, u: jax.Array, c: jax.Array, memory: jax.Array, *, rope: tuple[jax.Array, jax.Array],
                 memory_mask: jax.Array | None = None) -> jax.Array:
        """u [B, T, D]; c [B, D]; memory [B, L, D]; memory_mask [B, L] or None."""
        mod = self.adaLN_modulation(jax.nn.silu(c))  # [B, 6D]
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = jnp.split(mod, 6, axis=-1)
        n = modulate(self.norm1(u), shift_a, scale_a)
        if self.cross_attention:
            o = self.attn(n, memory, rope=rope, mask=memory_mask)
        else:
            o = self.attn(n, None, rope=rope)
        u = u + gate_a[:, None, :] * o
        n = modulate(self.norm2(u), shift_f, scale_f)
        return u + gate_f[:, None, :] * self.ffn(n)


class FinalLayer(nnx.Module):
    """y = linear(mod(RMS(u), shift, scale)) with (shift, scale) = chunk2(modulation_proj(SiLU c))."""

    def __init__(self, dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm_final = RMSNorm(dim, order="cast_then_scale", eps=1e-6, **kw)
        self.linear = dense(dim, out_dim, ("embed", "mlp"), rngs=rngs, **kw)
        self.modulation_proj = dense(dim, 2 * dim, ("embed", "mlp"), rngs=rngs,
                                     kernel_init=nnx.initializers.zeros_init(), **kw)

    def __call__(self, u: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.modulation_proj(jax.nn.silu(c)), 2, axis=-1)
        return self.linear(modulate(self.norm_final(u), shift, scale))


class LightningDiT(nnx.Module):
    """Timestep encoder + `num_layers` DiT blocks + final layer. RoPE tables are recomputed (not parameters)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, num_layers: int, out_dim: int, *, rngs: nnx.Rngs,
                 interleave: bool = True, attention_bias: bool = True, rope_base: float = 1e4,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.head_dim, self.rope_base = head_dim, rope_base
        self.timestep_encoder = TimestepEncoder(dim, rngs=rngs, **kw)
        self.transformer_blocks = nnx.List([
            DiTBlock(dim, num_heads, head_dim, cross_attention=(i % 2 == 1) or not interleave,
                     attention_bias=attention_bias, rngs=rngs, **kw)
            for i in range(num_layers)])
        self.final_layer = FinalLayer(dim, out_dim, rngs=rngs, **kw)

    def __call__(self, u: jax.Array, t: jax.Array, cond: jax.Array, memory: jax.Array,
                 memory_mask: jax.Array | None = None) -> jax.Array:
        """u [B, T, D] tokens; t [B] timesteps; cond [B, D] (ego embedding, added to temb); -> [B, T, out_dim]."""
        c = self.timestep_encoder(t) + cond  # [B, D]
        rope = rope_cos_sin(jnp.arange(u.shape[1]), self.head_dim, self.rope_base)
        for block in self.transformer_blocks:
            u = block(u, c, memory, rope=rope, memory_mask=memory_mask)
        return self.final_layer(u, c)
