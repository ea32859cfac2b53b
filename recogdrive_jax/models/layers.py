"""The one layer library of the planner DiT, InternViT and Qwen2: dense with logical axes, RMSNorm (with an explicit
cast order), RoPE, the attention kernel, SwiGLU, timm Mlp, sinusoidal embeddings, `token_logprobs`.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `norm`, `None`); the mapping to mesh axes
lives in `parallel/sharding.py`. Compute runs in `dtype` (fp32 default, bf16 for training), params stay in
`param_dtype`. Norm statistics and softmax always run in fp32; where their result returns to the compute dtype is
each model's upstream's choice (RMSNorm `order`). `dot_product_attention` is the single attention kernel every model
calls; its `impl` (a model's `attention_impl`) picks this file's einsum path or `jax.nn.dot_product_attention`
(cuDNN flash attention on a GPU). `remat` checkpoints a layer under a named policy (a model's `remat_policy`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from recogdrive_jax.parallel import kernels

Dtype = Any
Axes = tuple[str | None, ...]

default_kernel_init = nnx.initializers.xavier_uniform()


def dense(in_features: int, out_features: int, axes: Axes, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, use_bias: bool = True, kernel_init=default_kernel_init,
          bias_init=nnx.initializers.zeros_init()) -> nnx.Linear:
    """`nnx.Linear` whose kernel [in, out] carries `axes` and whose bias [out] carries `axes[1]`; its product is
    `flat_dot_general` (rows flattened)."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(kernel_init, tuple(axes)),
        bias_init=nnx.with_partitioning(bias_init, (axes[1],)), dot_general=flat_dot_general, rngs=rngs)


def flat_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None, preferred_element_type=None,
                     out_sharding=None) -> jax.Array:
    """`lax.dot_general` for a dense layer's x [..., D] x kernel [D, N], with x's leading axes flattened into one
    row axis first (any other product, or an explicit `out_sharding`, goes to `lax.dot_general` unchanged).

    Why: for x [B, T, D] autodiff derives the kernel gradient as a dot contracting two axes (B and T) of x and of
    the output gradient, which XLA's CPU backend lays out with a transposed copy of the gradient and runs as a slower
    product; on [B*T, D] rows it is one plain [D, B*T] x [B*T, N] GEMM. Forward and gradients are bitwise the same
    (one core, fwd + bwd: ViT fc1 [3, 1025, 1024] x [1024, 4096] 1.40x, Qwen2 gate_proj 1.37x, the LM head
    [2, 532, 896] x [896, 151,674] 1.74x; bench/RESULTS.md, ninth session)."""
    (lc, rc), (lb, rb) = dimension_numbers
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)
    if (out_sharding is None and lhs.ndim > 2 and rhs.ndim == 2 and tuple(lc) == (lhs.ndim - 1,)
            and tuple(rc) == (0,) and not lb and not rb):
        y = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())), **kw)
        return y.reshape(*lhs.shape[:-1], rhs.shape[-1])
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, out_sharding=out_sharding, **kw)


RMS_ORDERS = ("cast_then_scale", "scale_then_cast")


class RMSNorm(nnx.Module):
    """Weight-only RMSNorm: x / sqrt(mean(x^2) + eps) * weight, the statistics always in fp32.

    `order` says where the result leaves fp32 (identical at fp32; in bf16 they differ by one rounding):
      'cast_then_scale'  normalise in fp32, cast to the INPUT dtype, then multiply by the weight cast to that dtype;
                         output in the input dtype. transformers' Qwen2RMSNorm / InternVLVisionRMSNorm, InternViT's
                         remote-code InternRMSNorm (`weight * hidden.to(input_dtype)`) and ReCogDrive's DiT
                         blocks/rmsnorm.py (`_norm(x.float()).type_as(x) * weight`).
      'scale_then_cast'  multiply by the weight in fp32, cast once to `dtype` (one rounding).
    No default: each model states its upstream's order where it builds the norm.
    """

    def __init__(self, dim: int, *, order: str, eps: float = 1e-6, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # ones init needs no randomness; kept for a uniform constructor signature.
        if order not in RMS_ORDERS:
            raise ValueError(f"RMSNorm: order {order!r}; expected one of {RMS_ORDERS}")
        self.eps, self.order, self.dtype = eps, order, dtype
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if self.order == "cast_then_scale":
            return self.weight[...].astype(x.dtype) * y.astype(x.dtype)
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
# Rotary position embedding (rotate-half / NeoX layout) and the attention kernel.

def rope_inv_freq(head_dim: int, base: float = 1e4) -> np.ndarray:
    """theta_j = base^(-2j/head_dim), j < head_dim/2, as fp32 (the `inv_freq` buffer of torch rotary embedders).
    Computed on the host, so every backend uses the same table."""
    return (1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))).astype(
        np.float32)


def rope_cos_sin(positions: jax.Array, head_dim: int, base: float = 1e4) -> tuple[jax.Array, jax.Array]:
    """positions [...] (e.g. [T] or [B, T]) -> fp32 cos/sin tables [..., head_dim] for angles p * [theta || theta]."""
    inv = jnp.asarray(rope_inv_freq(head_dim, base))
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [..., hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [..., hd]
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., hd]; cos/sin broadcastable to x (e.g. [T, 1, hd] or [B, T, 1, hd] for x [B, T, H, hd]).

    cos/sin are cast to x.dtype and the rotation runs in x.dtype, as both upstreams do (transformers'
    `apply_rotary_pos_emb` gets cos/sin `.to(x.dtype)`; so does ReCogDrive's blocks/rope.py RotaryEmbedding)."""
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------------------------
# Rematerialisation policies (a model's `remat_policy`, used where its `remat` is on).

ATTENTION_OUT = "attention_out"  # checkpoint name of every attention output (`save_attention_out` keeps it)
REMAT_POLICIES = ("full", "dots_saveable", "dots_with_no_batch_dims_saveable", "save_attention_out")


def remat_policy(name: str):
    """The `jax.checkpoint` policy of a `remat_policy` name: 'full' saves nothing (recompute the whole layer),
    'dots_saveable' / 'dots_with_no_batch_dims_saveable' keep matmul outputs (all / those without batch dims:
    the projections, not the attention products), 'save_attention_out' keeps only each attention output."""
    table = {"full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable,
             "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
             "save_attention_out": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT)}
    if name not in table:
        raise ValueError(f"remat_policy {name!r}; expected one of {REMAT_POLICIES}")
    return table[name]


def remat(fn, policy: str, *, prevent_cse: bool = True):
    """`jax.checkpoint(fn)` under the named policy (`prevent_cse=False` inside a scan, where it is safe and
    faster)."""
    return jax.checkpoint(fn, policy=remat_policy(policy), prevent_cse=prevent_cse)


# Finite mask fill: a fully masked row (a pad query) gives a uniform softmax instead of NaN; with at least one
# visible key it underflows to exactly 0 like -inf would.
NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                          scale: float | None = None, divide_by: float | None = None,
                          impl: str = "xla") -> jax.Array:
    """softmax(q k^T * scale + mask) v, the one attention kernel of the DiT, InternViT and Qwen2.

    q [B, T, H, hd]; k, v [B, S, G, hd] with H a multiple of G (grouped-query: query head i reads kv head i // (H/G),
    transformers' `repeat_kv`); mask bool, broadcastable to [B, T, S] (True = attend), or None. Both products run
    in the compute dtype (bf16 operands in forward and backward: with `preferred_element_type=f32` JAX's transpose
    would feed the backward products fp32 operands), the logits are upcast to fp32 for the scale, mask and softmax,
    as transformers' eager attention does, and the probabilities cast back to v.dtype. fp32: unchanged. The logits are scaled
    by `scale` (default head_dim^-0.5: transformers' Qwen2 / InternViT), or divided by `divide_by` when given (the
    DiT port's order, `/ sqrt(head_dim)`, kept so its numbers stay bitwise what they were; the two differ in the
    last bit). Returns [B, T, H, hd].

    `impl` (a model's `attention_impl`): 'xla' this einsum path; 'jax_nn' `jax.nn.dot_product_attention`'s XLA
    path (logits from fp32-accumulating products, multiplied by the scale: equal to 'xla' at fp32 up to rounding);
    'cudnn' its cuDNN fused kernel (GPU, bf16/fp16 only); 'chunked' the einsum path over blocks of query rows
    (`_chunked_attention`: cache-sized logits; the same math); 'per_head' multi-head attention one (batch row,
    head) at a time where no gradient is taken, the einsum path under differentiation (`_per_head_attention`; the
    einsum path for grouped-query attention); 'auto' whatever `parallel/kernels.attention_impl`
    picks for the backend being traced for (cuDNN on a GPU in half precision; on CPU 'chunked' for fp32
    grouped-query attention over many queries, jax.nn for a decode step, 'per_head' for fp32 multi-head attention
    over many queries (the ViT), the einsum path for the rest: the
    fastest measured on CPU that keeps bf16 dot operands). Mask and GQA semantics are the same in all: a fully masked
    row attends uniformly.
    """
    b, t, h, hd = q.shape
    g = k.shape[2]
    if h % g:
        raise ValueError(f"dot_product_attention: {h} query heads is not a multiple of {g} key/value heads")
    chosen = kernels.attention_impl(impl, q.dtype, grouped=g < h, queries=t)
    if chosen in ("jax_nn", "cudnn"):
        try:
            return checkpoint_name(_jax_nn_attention(q, k, v, mask, implementation=chosen,
                                                     scale=(1.0 / divide_by) if divide_by is not None else scale),
                                   ATTENTION_OUT)
        except (ValueError, NotImplementedError, RuntimeError):
            if impl != "auto":  # asked for by name: its own error says which shape or dtype it refuses
                raise
            # 'auto' chose cuDNN, which refuses this shape/dtype at trace time: the einsum path instead

    def scaled(s):
        return s / divide_by if divide_by is not None else s * (hd ** -0.5 if scale is None else scale)

    if chosen == "chunked":
        rows = kernels.attention_chunk_rows(b, h, k.shape[1])
        if t > rows:
            return checkpoint_name(_chunked_attention(q, k, v, mask, scaled, rows), ATTENTION_OUT)
    if g == h and chosen == "per_head":
        return checkpoint_name(_per_head_attention(q, k, v, mask, scaled), ATTENTION_OUT)
    if g == h:
        return checkpoint_name(_multi_head_attention(q, k, v, mask, scaled), ATTENTION_OUT)
    return checkpoint_name(_grouped_attention(q, k, v, mask, scaled), ATTENTION_OUT)


def _multi_head_attention(q, k, v, mask, scaled) -> jax.Array:
    """The multi-head einsum path: products on [B, H, T, hd] (XLA's CPU results depend on the layout: this is the
    DiT's). q, k, v [B, T|S, H, hd] → [B, T, H, hd]."""
    qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    scores = scaled(jnp.einsum("bhtd,bhsd->bhts", qh, kh).astype(jnp.float32))  # [B, H, T, S]
    if mask is not None:
        scores = jnp.where(mask[:, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bhsd->bhtd", probs, vh).transpose(0, 2, 1, 3)


def _per_head_forward(q, k, v, mask, scaled) -> jax.Array:
    """The multi-head einsum path's math one (batch row, head) at a time (`lax.map`); forward only.

    Why: a [T, S] block's logits and probabilities stay in cache instead of streaming a [B, H, T, S] tensor through
    memory: the ViT's attention at InternVL3-1B widths (3 tiles x 1,025 tokens, 16 heads x 64) took 194 vs 395 ms
    forward (one core, CPU time, loaded machine). Its backward in blocks was slower than the einsum path's
    (bench/RESULTS.md, seventh session), hence only where no gradient is taken. q, k, v [B, T|S, H, hd] →
    [B, T, H, hd] (as many key/value heads as query heads: a grouped caller repeats them first)."""
    b, t, h, hd = q.shape
    s = k.shape[1]
    qh, kh, vh = (a.transpose(0, 2, 1, 3).reshape(b * h, a.shape[1], hd) for a in (q, k, v))
    if mask is not None:  # [B, T|1, S]: row i of the map reads its batch row's mask
        mask = jnp.broadcast_to(mask.reshape((1,) * (3 - mask.ndim) + mask.shape),
                                (b,) + mask.shape[-2:] if mask.ndim >= 2 else (b, 1, s))

    def one(a):
        qi, ki, vi, i = a  # [T, hd], [S, hd], [S, hd], index into B*H
        scores = scaled(jnp.einsum("td,sd->ts", qi, ki).astype(jnp.float32))
        if mask is not None:
            scores = jnp.where(jax.lax.dynamic_index_in_dim(mask, i // h, keepdims=False), scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(vi.dtype)
        return jnp.einsum("ts,sd->td", probs, vi)

    out = jax.lax.map(one, (qh, kh, vh, jnp.arange(b * h)))  # [B*H, T, hd]
    return out.reshape(b, h, t, hd).transpose(0, 2, 1, 3)


def _per_head_attention(q, k, v, mask, scaled) -> jax.Array:
    """`_per_head_forward` when no gradient is taken; under differentiation the einsum path itself (`jax.custom_vjp`:
    forward and backward are `_multi_head_attention` and its VJP, so gradients are exactly the einsum path's)."""

    def forward(q, k, v, mask):  # differentiated: the einsum path, its VJP kept for the backward
        out, vjp = jax.vjp(lambda q, k, v: _multi_head_attention(q, k, v, mask, scaled), q, k, v)
        return out, vjp

    def backward(vjp, dout):
        return (*vjp(dout), None)

    attention = jax.custom_vjp(lambda q, k, v, mask: _per_head_forward(q, k, v, mask, scaled))
    attention.defvjp(forward, backward)
    return attention(q, k, v, mask)


def _grouped_logits(q, k, mask, scaled) -> jax.Array:
    """q [B, T, H, hd], k [B, S, G, hd] → fp32 logits [B, G, R, T, S] (R = H / G), scaled and masked (mask
    broadcastable to [B, T, S]): Qwen2's GQA form, transformers' `repeat_kv` semantics."""
    b, t, h, hd = q.shape
    g = k.shape[2]
    qg = q.reshape(b, t, g, h // g, hd)
    scores = scaled(jnp.einsum("btgrd,bsgd->bgrts", qg, k).astype(jnp.float32))
    return scores if mask is None else jnp.where(mask[:, None, None], scores, NEG_INF)


def _grouped_attention(q, k, v, mask, scaled) -> jax.Array:
    """The grouped-query einsum path: q [B, T, H, hd], k/v [B, S, G, hd] → [B, T, H, hd]."""
    b, t, h, hd = q.shape
    probs = jax.nn.softmax(_grouped_logits(q, k, mask, scaled), axis=-1).astype(v.dtype)
    return jnp.einsum("bgrts,bsgd->btgrd", probs, v).reshape(b, t, h, hd)


def _chunked_attention(q, k, v, mask, scaled, rows: int) -> jax.Array:
    """The grouped einsum path over blocks of query rows (`lax.map`), with a flash-style backward.

    Each block's [B, H, rows, S] logits and probabilities stay in cache instead of streaming a [B, H, T, S] tensor
    (and, in the backward, its transposed copies) through memory. Every query row still takes one softmax over all S
    keys, so the forward is the einsum path's math (equal up to the products' rounding). The forward keeps only the
    output and each row's max and log-sum; the backward (a `lax.scan` over the same blocks) recomputes a block's
    probabilities from them and accumulates dK, dV in fp32, instead of stacking every block's probabilities for the
    backward. T is split into ceil(T / rows) equal blocks (≤ `rows`); the last block's pad rows are dropped. Where
    no gradient is taken the forward is `_per_head_forward` (faster forward-only; same math, see `primal`).
    """
    b, t, h, hd = q.shape
    g = k.shape[2]
    r = h // g
    n = -(-t // rows)
    rows = -(-t // n)  # the same number of blocks, as few pad rows as possible
    pad = n * rows - t

    def blocks(x):  # [B, T, ...] -> [n, B, rows, ...]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) if pad else x
        return x.reshape((x.shape[0], n, rows) + x.shape[2:]).swapaxes(0, 1)

    def unblock(x):  # [n, B, rows, ...] -> [B, T, ...]
        x = x.swapaxes(0, 1)
        return x.reshape((x.shape[0], n * rows) + x.shape[3:])[:, :t]

    per_query = mask is not None and mask.ndim >= 2 and mask.shape[-2] != 1
    # a per-query mask [B|1, T, S] goes in blocks with the queries; a key mask [B|1, 1, S] is shared by every block
    mask_blocks = blocks(mask.reshape((1,) * (3 - mask.ndim) + mask.shape)) if per_query else None

    def logits(qi, mi, k):  # qi [B, rows, H, hd] -> [B, G, R, rows, S]
        return _grouped_logits(qi, k, mi if per_query else mask, scaled)

    def forward(q, k, v, mb):
        def block(a):
            qi, mi = a
            s = logits(qi, mi, k)
            top = jnp.max(s, -1, keepdims=True)
            e = jnp.exp(s - top)
            total = jnp.sum(e, -1, keepdims=True)
            out = jnp.einsum("bgrts,bsgd->btgrd", (e / total).astype(v.dtype), v).reshape(b, rows, h, hd)
            # the row max and log-sum apart (not their sum, the log-sum-exp): a fully masked row's max is NEG_INF,
            # which would absorb log(S) and turn its uniform 1/S probabilities into 1
            return out, (top[..., 0], jnp.log(total)[..., 0])  # [B, rows, H, hd], 2 x [B, G, R, rows]

        out, lse = jax.lax.map(block, (blocks(q), mb))
        out = unblock(out)
        return out, (q, k, v, mb, out, lse)

    def backward(res, dout):
        q, k, v, mb, out, lse = res
        # D = rowsum(dO * O) per query and head: the softmax backward's correction term
        d_all = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, T, H]
        d_blocks = blocks(d_all).reshape(n, b, rows, g, r).transpose(0, 1, 3, 4, 2)  # [n, B, G, R, rows]

        def block(acc, a):
            dk, dv = acc
            qi, doi, (top, log_total), di, mi = a
            p = jnp.exp((logits(qi, mi, k) - top[..., None]) - log_total[..., None])  # [B, G, R, rows, S]
            dog = doi.reshape(b, rows, g, r, hd)
            dp = jnp.einsum("btgrd,bsgd->bgrts", dog, v).astype(jnp.float32)
            ds = scaled(p * (dp - di[..., None]))  # the scaling is linear: its own transpose
            m = mi if per_query else mask
            if m is not None:  # masked logits are constants (the `where`): no gradient, even in a fully masked row
                ds = jnp.where(m[:, None, None], ds, 0.0)
            ds = ds.astype(q.dtype)
            dq = jnp.einsum("bgrts,bsgd->btgrd", ds, k).reshape(b, rows, h, hd)
            dk = dk + jnp.einsum("bgrts,btgrd->bsgd", ds, qi.reshape(b, rows, g, r, hd)).astype(jnp.float32)
            dv = dv + jnp.einsum("bgrts,btgrd->bsgd", p.astype(v.dtype), dog).astype(jnp.float32)
            return (dk, dv), dq

        zero = jnp.zeros(k.shape, jnp.float32)
        (dk, dv), dq = jax.lax.scan(block, (zero, zero), (blocks(q), blocks(dout), lse, d_blocks, mb))
        return unblock(dq), dk.astype(k.dtype), dv.astype(v.dtype), None

    def primal(q, k, v, mb):
        # no gradient taken (prefill, scoring, the cache stage): the per-(batch row, head) forward with each key/value
        # head repeated for its R query heads was 1.8x these query blocks at the PPO scoring shape (4 x 1,048 tokens,
        # 4/2 heads x 16) and 1.5x at the 1B prefill (2 x 1,064, 14/2 x 64), one core, CPU time; same math
        return _per_head_forward(q, jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2), mask, scaled)

    attention = jax.custom_vjp(primal)
    attention.defvjp(forward, backward)
    return attention(q, k, v, mask_blocks)


def _jax_nn_attention(q, k, v, mask, *, scale: float | None, implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` with this module's mask convention (bool, broadcastable to [B, T, S])."""
    if mask is not None:  # -> [B|1, 1, T|1, S]: jax.nn wants 4-D masks broadcastable to [B, H, T, S]
        mask = mask.reshape((1,) * (3 - mask.ndim) + mask.shape)[:, None].astype(bool)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                        implementation="xla" if implementation == "jax_nn" else "cudnn")


class Attention(nnx.Module):
    """The DiT's multi-head attention (diffusers naming: to_q/to_k/to_v/to_out) with per-head RMSNorm on q and k
    (ReCogDrive's blocks/attention.py), then RoPE.

    RoPE is applied to q always and to k only in self-attention (`context is None`): cross-attention keys (the VL
    memory) carry no positions. Logits divided by sqrt(head_dim); an optional key mask [B, S] (True = attend).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs, context_dim: int | None = None,
                 use_bias: bool = True, qk_norm: bool = True, norm_eps: float = 1e-6, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, attention_impl: str = "xla"):
        inner = num_heads * head_dim
        self.attention_impl = attention_impl
        context_dim = dim if context_dim is None else context_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias)
        self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
        self.to_q = dense(dim, inner, ("embed", "heads"), **kw)
        self.to_k = dense(context_dim, inner, ("embed", "kv"), **kw)
        self.to_v = dense(context_dim, inner, ("embed", "kv"), **kw)
        if qk_norm:  # upstream blocks/rmsnorm.py: `_norm(x.float()).type_as(x) * weight`
            norm = dict(order="cast_then_scale", eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.q_norm, self.k_norm = RMSNorm(head_dim, **norm), RMSNorm(head_dim, **norm)
        else:
            self.q_norm = self.k_norm = None
        self.to_out = dense(inner, dim, ("heads", "embed"), **kw)

    def _split_heads(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)  # [B, H, T, hd]

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
                 rope: tuple[jax.Array, jax.Array] | None = None, mask: jax.Array | None = None) -> jax.Array:
        """x [B, T, dim]; context [B, S, context_dim] or None (self-attention); rope (cos, sin) [T, hd];
        mask [B, S] bool or None."""
        is_self = context is None
        ctx = x if is_self else context
        # q/k norm and RoPE on [B, H, T, hd], as this module always did (the layout fixes XLA's reduction order of
        # the norm weights' gradients, so the planner's numbers stay bitwise what they were).
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
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, T|S, H, hd]
        o = dot_product_attention(q, k, v, None if mask is None else mask[:, None, :],
                                  divide_by=math.sqrt(self.head_dim), impl=self.attention_impl)  # [B, T, H, hd]
        b, t = o.shape[:2]
        return self.to_out(o.reshape(b, t, self.num_heads * self.head_dim))


def matvec_rows(x: jax.Array, kernel: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
    """x [..., D] @ kernel [D, N] as one matrix-vector product per row of x (for a handful of rows: a decode step).

    Why: XLA's CPU backend runs a [M, D] x [D, N] dot with M ≥ 2 as a GEMM that packs the weight (every weight byte
    read, written and read again), but a vector x matrix product with its streaming matrix-vector kernel, which reads
    the weight once. For the LM head of a 2-row decode step (a [896, 151,674] fp32 weight, 543 MB) two matvecs took
    40 ms against the dot's 58 ms (bench/vlm.py --profile, CPU time, one core); from 3 rows on the GEMM reads less
    (`kernels.MATVEC_MAX_ROWS`). Operands are cast to `dtype` as `nnx.Linear` does; the sums are the same products
    in another order (equal up to rounding)."""
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    rows = x.reshape(-1, x.shape[-1])
    out = jnp.stack([rows[i] @ kernel for i in range(rows.shape[0])])
    return out.reshape(x.shape[:-1] + (kernel.shape[-1],))


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


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log softmax(logits / temperature)[targets]: logits [..., V] (aligned so logits[..., i, :] predicts
    targets[..., i]), targets [...] int -> [...] fp32. The one token log-prob of the LM loss, PPO ratios and tests.

    `jax.nn.log_softmax`'s arithmetic (shift by the max first, so a near-certain token keeps its small log-prob
    exactly instead of losing it in max + log(sum)), gathering the target before the subtraction so no [..., V]
    log-prob array is needed. Its gradient is written out (`_picked_log_softmax`), the same arithmetic autodiff
    derives, so that nothing [..., V]-sized but the logits is kept for the backward."""
    logits = logits.astype(jnp.float32)
    if not (isinstance(temperature, (int, float)) and temperature == 1.0):  # may be traced
        logits = logits / temperature
    return _picked_log_softmax(logits, targets.astype(jnp.int32))


@jax.custom_vjp
def _picked_log_softmax(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return _picked_log_softmax_fwd(logits, targets)[0]


def _picked_log_softmax_fwd(logits, targets):
    top = jnp.max(logits, axis=-1, keepdims=True)  # [..., 1]
    shifted = logits - top
    picked = jnp.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.exp(shifted), axis=-1)  # [...]
    return picked - jnp.log(total), (logits, top, total, targets)


def _picked_log_softmax_bwd(res, g):
    """d lp / d logits = onehot(target) - softmax, as autodiff of the forward computes it (the max is a constant:
    shifting by it does not change the log-softmax): g at the target plus exp(shifted) x (-g / total), the one
    [..., V] pass of the backward. Without it, the SFT step's remat of the saved logits copied them once more
    (`reduce_precision` on a residual) and re-ran the max and exp passes (bench/RESULTS.md, ninth session)."""
    logits, top, total, targets = res
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    d = jnp.exp(logits - top) * (-g / total)[..., None] + jnp.where(iota == targets[..., None], g[..., None], 0.0)
    return d, None


_picked_log_softmax.defvjp(_picked_log_softmax_fwd, _picked_log_softmax_bwd)


def first_argmax(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, -1)` (the first maximum; the first NaN if any) as two plain reductions, max then the
    lowest index holding it: XLA's CPU backend runs argmax's (value, index) pair reduction unvectorised, 1.34 vs
    0.24 ms over a [2, 151,674] vocabulary (one core), ~2 % of a 1B-width decode step.
    logits [..., V] → int32 [...]."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    nan = jnp.isnan(logits)
    hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, logits == top)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hit, iota, logits.shape[-1]), axis=-1)


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
    "dense", "flat_dot_general", "matvec_rows", "RMSNorm", "RMS_ORDERS", "LayerNorm", "Mlp", "SwiGLU", "Attention",
    "dot_product_attention",
    "NEG_INF",
    "ATTENTION_OUT", "REMAT_POLICIES", "remat_policy", "remat",
    "rope_inv_freq", "rope_cos_sin", "rotate_half", "apply_rope", "sinusoidal_embedding", "TimestepEmbedding",
    "modulate", "token_logprobs", "first_argmax", "to_dtype", "count_params",
]
