"""Qwen2 / Qwen2.5 decoder (the InternVL3 LLM) as a Flax NNX module, with a fixed-size KV cache.

Architecture (spec §1): RMSNorm, SiLU-gated MLP, GQA with q/k/v bias and o_proj without bias, rotate-half RoPE
with θ from the config, untied `lm_head` (tie option). Layers are stacked on a `layers` axis and run with
`lax.scan`; `remat=True` checkpoints each layer under `remat_policy` (layers.REMAT_POLICIES); `attention_impl`
picks the attention kernel (layers.dot_product_attention).

One attention path serves training, prefill and decode: keys live in "slots" 0..S-1 (S = T without a cache,
the cache length with one); `mask` [B, T, S] says which slot each query may see. RoPE positions are separate
(`positions` [B, T], cumsum of the padding mask), so left and right padding both work. Dense, RMSNorm, RoPE and the
attention kernel come from `models/layers.py`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from recogdrive_jax.models.layers import (RMSNorm, apply_rope, dense, dot_product_attention, matvec_rows, remat,
                                          rope_cos_sin)
from recogdrive_jax.parallel import kernels
from recogdrive_jax.parallel.activations import constrain

Dtype = Any


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


def _linear(din: int, dout: int, axes: tuple, cfg: Qwen2Config, *, bias: bool, dtype: Dtype, param_dtype: Dtype,
            rngs: nnx.Rngs) -> nnx.Linear:
    return dense(din, dout, axes, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                 kernel_init=nnx.initializers.normal(cfg.initializer_range))


def _rms_norm(cfg: Qwen2Config, dtype: Dtype, param_dtype: Dtype) -> RMSNorm:
    """transformers' Qwen2RMSNorm casts before scaling: `weight * hidden.to(input_dtype)`."""
    return RMSNorm(cfg.hidden_size, order="cast_then_scale", eps=cfg.rms_norm_eps, dtype=dtype,
                   param_dtype=param_dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
                 attention_impl: str = "xla"):
        self.cfg = cfg
        self.attention_impl = attention_impl
        d, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = _linear(d, cfg.num_attention_heads * hd, ("embed", "heads"), cfg, bias=True, **kw)
        self.k_proj = _linear(d, cfg.num_key_value_heads * hd, ("embed", "kv"), cfg, bias=True, **kw)
        self.v_proj = _linear(d, cfg.num_key_value_heads * hd, ("embed", "kv"), cfg, bias=True, **kw)
        self.o_proj = _linear(cfg.num_attention_heads * hd, d, ("heads", "embed"), cfg, bias=False, **kw)

    def __call__(self, x, cos, sin, mask, cache_kv=None, cache_index=None):
        """x [B, T, D]; cos/sin [B, T, 1, hd]; mask [B, T, S] bool. Returns out [B, T, D] and (k, v)
        [B, S, KV, hd]."""
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
        out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask,
                                    impl=self.attention_impl)  # GQA; scale hd^-0.5
        return self.o_proj(out.reshape(b, t, h * hd)), kv_out


class Mlp(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _linear(d, f, ("embed", "mlp"), cfg, **kw)
        self.up_proj = _linear(d, f, ("embed", "mlp"), cfg, **kw)
        self.down_proj = _linear(f, d, ("mlp", "embed"), cfg, **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
                 attention_impl: str = "xla"):
        self.input_layernorm = _rms_norm(cfg, dtype, param_dtype)
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention_impl=attention_impl)
        self.post_attention_layernorm = _rms_norm(cfg, dtype, param_dtype)
        self.mlp = Mlp(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache_kv=None, cache_index=None):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_kv, cache_index)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Qwen2Model(nnx.Module):
    """Embedding + stacked decoder layers + final norm (`language_model.model.*`)."""

    def __init__(self, cfg: Qwen2Config, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 remat: bool = False, remat_policy: str = "full", attention_impl: str = "xla", rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.remat, self.remat_policy = remat, remat_policy
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(cfg.initializer_range), ("vocab", "embed")),
            rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention_impl=attention_impl)

        self.layers = make_layers(rngs)
        self.norm = _rms_norm(cfg, dtype, param_dtype)

    def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, mask: jax.Array,
                 cache: dict | None = None, cache_index: jax.Array | None = None, *,
                 layer_states: tuple | None = None):
        """inputs_embeds [B, T, D], positions [B, T], mask [B, T, S] → (hidden after final norm [B, T, D],
        new cache {'k','v': [L, B, S, KV, hd]} or None). `layer_states` (from `layer_states()`, taken outside a
        decode loop): run the layers unrolled on those per-layer weights instead of scanning the stacked ones."""
        cfg = self.cfg
        cos, sin = (a[:, :, None, :] for a in rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta))  # [B, T, 1, hd]
        graphdef, state = nnx.split(self.layers)
        x = inputs_embeds.astype(self.dtype)
        x = constrain(x, ("batch", "seq", "embed"))  # hidden states entering the layer stack

        def body(h, xs):
            layer = nnx.merge(graphdef, xs[0])
            kv = None if cache is None else (xs[1], xs[2])
            h, kv_out = layer(h, cos, sin, mask, kv, cache_index)
            return h, (kv_out if cache is not None else None)

        if self.remat:
            body = remat(body, self.remat_policy, prevent_cse=False)
        if layer_states is not None:  # per-layer weights sliced once by the caller: a Python loop over layers
            outs = []
            for i, layer_state in enumerate(layer_states):
                x, kv = body(x, (layer_state,) if cache is None else (layer_state, cache["k"][i], cache["v"][i]))
                outs.append(kv)
            kvs = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)  # as the scan stacks them
        else:
            x, kvs = jax.lax.scan(body, x, (state,) if cache is None else (state, cache["k"], cache["v"]))
        new_cache = None if cache is None else {"k": kvs[0], "v": kvs[1]}
        return self.norm(x), new_cache

    def layer_states(self) -> tuple:
        """The stacked layers' parameters as one state per layer, for `__call__(..., layer_states=...)`.

        Why: inside a decode loop, `lax.scan` over the stacked layers slices each layer's weights with a
        dynamic-slice, which XLA's CPU backend copies (every weight byte read and written once more per token: ~11 %
        of a decode step at InternVL3-1B widths). Slicing once before the loop and passing the slices in makes them
        loop invariants that the dots read in place."""
        _, state = nnx.split(self.layers)
        return tuple(jax.tree.map(lambda a, i=i: a[i], state) for i in range(self.cfg.num_hidden_layers))


class Qwen2ForCausalLM(nnx.Module):
    """`model` + `lm_head` (absent when tie_word_embeddings: logits use the embedding matrix)."""

    def __init__(self, cfg: Qwen2Config, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 remat: bool = False, remat_policy: str = "full", attention_impl: str = "xla", rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = Qwen2Model(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, remat_policy=remat_policy,
                                attention_impl=attention_impl, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg, bias=False, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] → fp32 logits [..., V]."""
        if self.cfg.tie_word_embeddings:  # rows flattened as `layers.flat_dot_general` does for the untied head
            out = self.model.embed_tokens.attend(hidden.reshape(-1, hidden.shape[-1]))
            out = out.reshape(*hidden.shape[:-1], out.shape[-1])
        elif kernels.matvec_rows(math.prod(hidden.shape[:-1])):  # a decode step's few rows, on CPU
            out = matvec_rows(hidden, self.lm_head.kernel[...], self.lm_head.dtype)
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
