"""Qwen2 / Qwen2.5 decoder (the InternVL3 LLM) as a Flax NNX module, with a fixed-size KV cache.

Architecture (spec §1): RMSNorm, SiLU-gated MLP, GQA with q/k/v bias and o_proj without bias, rotate-half RoPE
with θ from the config, untied `lm_head` (tie option). Layers are stacked on a `layers` axis and run with
`lax.scan`; `remat=True` checkpoints each layer.

One attention path serves training, prefill and decode: keys live in "slots" 0..S-1 (S = T without a cache,
the cache length with one); `mask` [B, T, S] says which slot each query may see. RoPE positions are separate
(`positions` [B, T], cumsum of the padding mask), so left and right padding both work.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from recogdrive_jax.models.internvit import RMSNorm, dense

Dtype = Any
NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully-masked rows (pads) give uniform, not NaN


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """LLM shape. Field names follow HF `Qwen2Config`."""

    vocab_size: int = 151674
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    # Recorded for export as sorted (key, value) pairs (hashable: the config is static jit metadata); dynamic NTK
    # only changes anything beyond max_position_embeddings.
    rope_scaling: tuple | dict | None = None
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    attention_dropout: float = 0.0

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"llm_config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise ValueError(f"llm_config: hidden_act {self.hidden_act!r}; only 'silu' is supported")
        if isinstance(self.rope_scaling, dict):  # canonical: 'rope_type' (HF also writes the legacy 'type')
            rs = dict(self.rope_scaling)
            if "type" in rs:
                rs.setdefault("rope_type", rs.pop("type"))
            rs.pop("rope_theta", None)
            object.__setattr__(self, "rope_scaling", tuple(sorted(rs.items())) if rs else None)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"llm_config: hidden_size {self.hidden_size} not divisible by heads")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] → cos, sin [B, T, head_dim] (fp32, HF `cat(freqs, freqs)` layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, hd]; rotate_half convention."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rot * sin


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, std=cfg.initializer_range)
        self.q_proj = dense(d, cfg.num_attention_heads * hd, ("embed", "heads"), bias=True, **kw)
        self.k_proj = dense(d, cfg.num_key_value_heads * hd, ("embed", "kv"), bias=True, **kw)
        self.v_proj = dense(d, cfg.num_key_value_heads * hd, ("embed", "kv"), bias=True, **kw)
        self.o_proj = dense(cfg.num_attention_heads * hd, d, ("heads", "embed"), bias=False, **kw)

    def __call__(self, x, cos, sin, mask, cache_kv=None, cache_index=None):
        """x [B, T, D]; mask [B, T, S] bool. Returns out [B, T, D] and (k, v) [B, S, KV, hd]."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, g, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = apply_rope(self.q_proj(x).reshape(b, t, h, hd), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, g, hd), cos, sin)
        v = self.v_proj(x).reshape(b, t, g, hd)
        if cache_kv is not None:  # write this chunk at slots [cache_index, cache_index + T)
            ck, cv = cache_kv
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
        kv_out = (k, v)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        q = q.reshape(b, t, g, h // g, hd)  # query head i uses kv head i // rep, as HF repeat_kv
        scores = jnp.einsum("btgrd,bsgd->bgrts", q, k, preferred_element_type=jnp.float32) * hd ** -0.5
        scores = jnp.where(mask[:, None, None], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bgrts,bsgd->btgrd", probs, v).reshape(b, t, h * hd)
        return self.o_proj(out), kv_out


class Mlp(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs, std=cfg.initializer_range)
        self.gate_proj = dense(d, f, ("embed", "mlp"), **kw)
        self.up_proj = dense(d, f, ("embed", "mlp"), **kw)
        self.down_proj = dense(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = Mlp(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache_kv=None, cache_index=None):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_kv, cache_index)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Qwen2Model(nnx.Module):
    """Embedding + stacked decoder layers + final norm (`language_model.model.*`)."""

    def __init__(self, cfg: Qwen2Config, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 remat: bool = False, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(cfg.initializer_range), ("vocab", "embed")),
            rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, mask: jax.Array,
                 cache: dict | None = None, cache_index: jax.Array | None = None):
        """inputs_embeds [B, T, D], positions [B, T], mask [B, T, S] → (hidden after final norm [B, T, D],
        new cache {'k','v': [L, B, S, KV, hd]} or None)."""
        cfg = self.cfg
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        graphdef, state = nnx.split(self.layers)
        x = inputs_embeds.astype(self.dtype)

        def body(h, xs):
            layer = nnx.merge(graphdef, xs[0])
            kv = None if cache is None else (xs[1], xs[2])
            h, kv_out = layer(h, cos, sin, mask, kv, cache_index)
            return h, (kv_out if cache is not None else None)

        if self.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        xs = (state,) if cache is None else (state, cache["k"], cache["v"])
        x, kvs = jax.lax.scan(body, x, xs)
        new_cache = None if cache is None else {"k": kvs[0], "v": kvs[1]}
        return self.norm(x), new_cache


class Qwen2ForCausalLM(nnx.Module):
    """`model` + `lm_head` (absent when tie_word_embeddings: logits use the embedding matrix)."""

    def __init__(self, cfg: Qwen2Config, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 remat: bool = False, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = Qwen2Model(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs, std=cfg.initializer_range)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] → fp32 logits [..., V]."""
        if self.cfg.tie_word_embeddings:
            out = self.model.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)


def attention_mask_2d_to_3d(attention_mask: jax.Array) -> jax.Array:
    """Padding mask [B, T] (1 = real) → causal+padding mask [B, T, T] over slots 0..T-1."""
    t = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None] & attention_mask.astype(bool)[:, None, :]


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """HF/ReCogDrive convention: cumsum(mask) - 1, pads set to 1 (their value does not matter)."""
    m = attention_mask.astype(jnp.int32)
    return jnp.where(m > 0, jnp.cumsum(m, axis=-1) - 1, 1)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) under `logits`: logits [..., V], targets [...] int → [...] fp32 (for PPO ratios)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - lse
