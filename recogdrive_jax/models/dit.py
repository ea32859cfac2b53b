"""LightningDiT as used by the ReCogDrive planner (spec/planner.md §2 step 6-8).

Blocks alternate self-attention (even index) and cross-attention to the VL memory (odd index) when
`interleave` is on (upstream default; without it every block cross-attends); every block is adaLN-zero modulated by
c = temb(t) + e (ego embedding), has per-head RMSNorm on q/k, RoPE at query positions 0..T-1 (keys rotated only in
self-attention) and a SwiGLU FFN with hidden width D. Attribute names mirror the upstream torch modules so checkpoint
conversion is a mechanical rename. Every RMSNorm casts before scaling, as upstream's blocks/rmsnorm.py does
(`_norm(x.float()).type_as(x) * weight`).

Two parameter layouts of the blocks (`scan_layers`): a list `transformer_blocks.<i>.*` (upstream's, run as a Python
loop), or one stacked block whose every parameter has a leading `layers` axis [L, ...] run with `lax.scan` (one
compiled block: compile time and code size independent of L). With `interleave` the scan runs over (self, cross)
pairs. `planner.stack_blocks` / `unstack_blocks` convert a parameter tree between the layouts. `remat` checkpoints
each block under `remat_policy` (layers.REMAT_POLICIES).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from recogdrive_jax.models.layers import (ATTENTION_OUT, NEG_INF, Attention, Dtype, RMSNorm, SwiGLU, TimestepEmbedding,
                                          apply_rope, dense, modulate, remat, rope_cos_sin, sinusoidal_embedding)
from recogdrive_jax.parallel import kernels

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


def cross_attention_folded(attn: Attention, x: jax.Array, memory: jax.Array, rope: tuple[jax.Array, jax.Array],
                           mask: jax.Array | None = None) -> jax.Array | None:
    """`attn(x, memory, rope=rope, mask=mask)` reassociated for few queries on a long memory, or None where it does not
    apply (bf16, no qk norm, a fused attention kernel): the fp32 einsum path only. Same math, the products' rounding
    differs (tolerance, not bitwise, vs `attn`). Two folds (bench/RESULTS.md, planner train step profile):

    - key norm into the queries: a normalised key row is k r w with r = rsqrt(mean(k^2) + eps) per (token, head) and
      w the norm weight, so q . (k r w) = r ((q w) . k): the logits come from the raw keys, w multiplies the T query
      rows instead of the S memory rows, and r [B, H, S] scales the logits. The normalised [B, H, S, hd] keys (and
      in the backward their gradient and w's reduction over B*S*H rows) are never formed.
    - value projection after the attention: sum_s p_s (m_s Wv + bv) = (sum_s p_s m_s) Wv + bv (the probabilities of
      a row sum to 1), so the memory is averaged first ([B, H, T, S] x [B, S, D], no head split of the memory) and
      only the B*H*T averages meet Wv, instead of projecting all B*S memory rows: with T = 8 queries on S = 256
      memory tokens the cross block's value work (forward and backward) shrinks ~5x and no [B, H, S, hd] value
      copy or transpose is made.
    """
    k_norm = attn.k_norm
    if k_norm is None or attn.dtype != jnp.float32 or memory.dtype != jnp.float32:
        return None
    b, t, _ = x.shape
    if kernels.attention_impl(attn.attention_impl, jnp.float32, grouped=False, queries=t) != "xla":
        return None
    nh, hd = attn.num_heads, attn.head_dim
    q = attn.q_norm(attn._split_heads(attn.to_q(x)))  # [B, H, T, hd]
    if rope is not None:
        q = apply_rope(q, *rope)
    k = attn._split_heads(attn.to_k(memory))  # [B, H, S, hd], not normalised
    r = jax.lax.rsqrt(jnp.mean(jnp.square(k), axis=-1) + k_norm.eps)  # [B, H, S]
    q = q * k_norm.weight[...]
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k) * r[:, :, None, :] / math.sqrt(hd)  # [B, H, T, S]
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    pooled = jnp.einsum("bhts,bsc->bhtc", probs, memory)  # [B, H, T, D]: each row's attention-weighted memory
    wv = attn.to_v.kernel[...].reshape(memory.shape[-1], nh, hd)  # [D, H, hd]
    o = jnp.einsum("bhtc,chd->bthd", pooled, wv)  # [B, T, H, hd]
    if attn.to_v.bias is not None:
        o = o + attn.to_v.bias[...].reshape(nh, hd)
    o = checkpoint_name(o, ATTENTION_OUT)
    return attn.to_out(o.reshape(b, t, nh * hd))


def set_fold_cross(module: nnx.Module, on: bool) -> nnx.Module:
    """Switch every DiT block under `module` to the folded cross-attention (`on`) or the module path; returns it.

    The fold is the faster form where each query row has its own long memory (IL training); where one memory serves
    many rows (RL: G chains x K steps of a scene) projecting it once on the module path is cheaper (rl/grpo.py)."""
    for _, mod in nnx.iter_modules(module):
        if isinstance(mod, DiTBlock):
            mod.fold_cross = on
    return module


class DiTBlock(nnx.Module):
    """adaLN-zero block: u += gate_a * attn(mod(RMS(u))); u += gate_f * ffn(mod(RMS(u)))."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, cross_attention: bool, rngs: nnx.Rngs,
                 ffn_hidden: int | None = None, attention_bias: bool = True, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, attention_impl: str = "xla"):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.cross_attention = cross_attention
        self.fold_cross = True  # cross-attention via `cross_attention_folded` where it applies
        self.norm1 = RMSNorm(dim, order="cast_then_scale", eps=1e-6, **kw)
        # cross_attention_dim = inner_dim upstream: the memory is already projected to D.
        self.attn = Attention(dim, num_heads, head_dim, context_dim=dim, use_bias=attention_bias, rngs=rngs,
                              attention_impl=attention_impl, **kw)
        self.norm2 = RMSNorm(dim, order="cast_then_scale", eps=1e-6, **kw)
        self.ffn = SwiGLU(dim, dim if ffn_hidden is None else ffn_hidden, rngs=rngs, **kw)
        self.adaLN_modulation = dense(dim, 6 * dim, ("embed", "mlp"), rngs=rngs,
                                      kernel_init=nnx.initializers.zeros_init(), **kw)

    def __call__(self, u: jax.Array, c: jax.Array, memory: jax.Array, *, rope: tuple[jax.Array, jax.Array],
                 memory_mask: jax.Array | None = None, cross_attention: bool | None = None) -> jax.Array:
        """u [B, T, D]; c [B, D]; memory [B, L, D]; memory_mask [B, L] or None. `cross_attention` overrides the
        block's own kind (the stacked block of the scanned layout serves both)."""
        cross = self.cross_attention if cross_attention is None else cross_attention
        mod = self.adaLN_modulation(jax.nn.silu(c))  # [B, 6D]
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = jnp.split(mod, 6, axis=-1)
        n = modulate(self.norm1(u), shift_a, scale_a)
        if cross:
            o = cross_attention_folded(self.attn, n, memory, rope, memory_mask) if self.fold_cross else None
            if o is None:
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
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, attention_impl: str = "xla",
                 scan_layers: bool = False, remat: bool = False, remat_policy: str = "full"):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.head_dim, self.rope_base = head_dim, rope_base
        self.num_layers, self.interleave, self.scan_layers = num_layers, interleave, scan_layers
        self.remat, self.remat_policy = remat, remat_policy
        self.timestep_encoder = TimestepEncoder(dim, rngs=rngs, **kw)
        block = dict(attention_bias=attention_bias, attention_impl=attention_impl, **kw)
        if scan_layers:
            @nnx.split_rngs(splits=num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs: nnx.Rngs) -> DiTBlock:
                return DiTBlock(dim, num_heads, head_dim, cross_attention=not interleave, rngs=rngs, **block)

            self.transformer_blocks = make_blocks(rngs)
        else:
            self.transformer_blocks = nnx.List([
                DiTBlock(dim, num_heads, head_dim, cross_attention=self.is_cross(i), rngs=rngs, **block)
                for i in range(num_layers)])
        self.final_layer = FinalLayer(dim, out_dim, rngs=rngs, **kw)

    def is_cross(self, i: int) -> bool:
        """Block i cross-attends to the memory (odd blocks with `interleave`, all without)."""
        return (i % 2 == 1) or not self.interleave

    def __call__(self, u: jax.Array, t: jax.Array, cond: jax.Array, memory: jax.Array,
                 memory_mask: jax.Array | None = None) -> jax.Array:
        """u [B, T, D] tokens; t [B] timesteps; cond [B, D] (ego embedding, added to temb); -> [B, T, out_dim]."""
        c = self.timestep_encoder(t) + cond  # [B, D]
        rope = rope_cos_sin(jnp.arange(u.shape[1]), self.head_dim, self.rope_base)
        if self.scan_layers:
            u = self._scanned_blocks(u, c, memory, rope, memory_mask)
        else:
            for i, block in enumerate(self.transformer_blocks):
                if self.remat:
                    u = self._block_fn(nnx.graphdef(block), self.is_cross(i), prevent_cse=True)(
                        nnx.state(block), u, c, memory, rope, memory_mask)
                else:
                    u = block(u, c, memory, rope=rope, memory_mask=memory_mask)
        return self.final_layer(u, c)

    def _block_fn(self, graphdef, cross: bool, *, prevent_cse: bool):
        """(block state, u, c, memory, rope, mask) -> u: one block, checkpointed when `remat` is on."""
        def fn(state, u, c, memory, rope, memory_mask):
            return nnx.merge(graphdef, state)(u, c, memory, rope=rope, memory_mask=memory_mask,
                                              cross_attention=cross)
        return remat(fn, self.remat_policy, prevent_cse=prevent_cse) if self.remat else fn

    def _scanned_blocks(self, u, c, memory, rope, memory_mask):
        """The stacked blocks [L, ...] with `lax.scan`: over blocks (all cross-attending), or over (self, cross)
        pairs with `interleave` (an odd last block, self-attending, runs after the scan)."""
        graphdef, state = nnx.split(self.transformer_blocks)
        cross_fn = self._block_fn(graphdef, True, prevent_cse=False)
        if not self.interleave:
            u, _ = jax.lax.scan(lambda h, s: (cross_fn(s, h, c, memory, rope, memory_mask), None), u, state)
            return u
        self_fn = self._block_fn(graphdef, False, prevent_cse=False)
        n = self.num_layers // 2
        pairs = jax.tree.map(lambda a: a[:2 * n].reshape((n, 2) + a.shape[1:]), state)  # [L/2, 2, ...]

        def body(h, s):
            h = self_fn(jax.tree.map(lambda a: a[0], s), h, c, memory, rope, memory_mask)
            return cross_fn(jax.tree.map(lambda a: a[1], s), h, c, memory, rope, memory_mask), None

        if n:
            u, _ = jax.lax.scan(body, u, pairs)
        if self.num_layers % 2:
            u = self._block_fn(graphdef, False, prevent_cse=True)(
                jax.tree.map(lambda a: a[-1], state), u, c, memory, rope, memory_mask)
        return u
