"""InternViT (InternViT-300M-448px-V2_5 and the 6B-style variant) as a Flax NNX module.

Follows `spec/internvl.md` §1: pre-norm blocks with learned layer scale (`ls1`, `ls2`), exact erf GELU, a fused
`qkv` projection whose rows are (q | k | v) × (head, head_dim), bidirectional attention with scale head_dim^-0.5,
optional RMSNorm over the *whole* q/k width (`qk_normalization`, InternViT-6B), and no final norm. Layers are
stacked on a leading `layers` axis and run with `lax.scan` (one compiled block, optional remat under
`remat_policy`; `attention_impl` picks the attention kernel).

Images are NHWC: `pixel_values` [T, H, W, 3] (the PyTorch code uses NCHW; the converter transposes the patch
conv OIHW → HWIO). Dense, RMSNorm and the attention kernel come from `models/layers.py`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from recogdrive_jax.models.layers import RMSNorm, dense, dot_product_attention, remat
from recogdrive_jax.parallel.activations import constrain

Dtype = Any

_NORM_TYPES = ("layer_norm", "rms_norm")


@dataclasses.dataclass(frozen=True)
class InternViTConfig:
    """Vision-tower shape. Field names follow the original `InternVisionConfig` (remote code)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    qk_normalization: bool = False
    norm_type: str = "layer_norm"
    layer_norm_eps: float = 1e-6
    initializer_factor: float = 0.1  # layer-scale init; checkpoints override it
    initializer_range: float = 0.02
    drop_path_rate: float = 0.0
    hidden_act: str = "gelu"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision_config: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision_config: image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if self.norm_type not in _NORM_TYPES:
            raise ValueError(f"vision_config: norm_type {self.norm_type!r}; expected one of {_NORM_TYPES}")
        if self.hidden_act != "gelu":
            raise ValueError(f"vision_config: hidden_act {self.hidden_act!r}; only exact 'gelu' is supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size ** 2 + 1


def _normal(std: float = 0.02):
    return nnx.initializers.normal(std)


def rms_norm(dim: int, eps: float, *, dtype: Dtype, param_dtype: Dtype) -> RMSNorm:
    """InternViT's InternRMSNorm casts before scaling (`weight * hidden.to(input_dtype)`), as does transformers'
    InternVLVisionRMSNorm."""
    return RMSNorm(dim, order="cast_then_scale", eps=eps, dtype=dtype, param_dtype=param_dtype)


def make_norm(kind: str, dim: int, eps: float, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    if kind == "rms_norm":
        return rms_norm(dim, eps, dtype=dtype, param_dtype=param_dtype)
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                         scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: InternViTConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
                 attention_impl: str = "xla"):
        d = cfg.hidden_size
        self.cfg = cfg
        self.attention_impl = attention_impl
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=_normal())
        self.qkv = dense(d, 3 * d, ("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        self.proj = dense(d, d, ("heads", "embed"), **kw)
        if cfg.qk_normalization:
            self.q_norm = rms_norm(d, cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = rms_norm(d, cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        t, n, d = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)  # each [T, N, D]
        if cfg.qk_normalization:  # over the whole width, before splitting heads (InternViT-6B)
            q, k = self.q_norm(q), self.k_norm(k)
        h, hd = cfg.num_attention_heads, cfg.head_dim
        q, k, v = (a.reshape(t, n, h, hd) for a in (q, k, v))  # tiles are the batch: [T, N, H, hd]
        out = dot_product_attention(q, k, v, impl=self.attention_impl)  # bidirectional, scale hd^-0.5
        return self.proj(out.reshape(t, n, d))


class VisionMlp(nnx.Module):
    def __init__(self, cfg: InternViTConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=_normal())
        self.fc1 = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionBlock(nnx.Module):
    """x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x)), with optional per-sample drop path."""

    def __init__(self, cfg: InternViTConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
                 attention_impl: str = "xla"):
        d = cfg.hidden_size
        self.norm1 = make_norm(cfg.norm_type, d, cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                    attention_impl=attention_impl)
        self.norm2 = make_norm(cfg.norm_type, d, cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = VisionMlp(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ls1 = nnx.Param(jnp.full((d,), cfg.initializer_factor, param_dtype), out_sharding=("embed",))
        self.ls2 = nnx.Param(jnp.full((d,), cfg.initializer_factor, param_dtype), out_sharding=("embed",))

    def __call__(self, x: jax.Array, drop_rate: jax.Array | None = None, key: jax.Array | None = None) -> jax.Array:
        dtype = x.dtype
        a = self.ls1[...].astype(dtype) * self.attn(self.norm1(x))
        if key is not None:
            k1, k2 = jax.random.split(key)
            a = _drop_path(a, drop_rate, k1)
        x = x + a
        m = self.ls2[...].astype(dtype) * self.mlp(self.norm2(x))
        if key is not None:
            m = _drop_path(m, drop_rate, k2)
        return x + m


def _drop_path(x: jax.Array, rate: jax.Array, key: jax.Array) -> jax.Array:
    """timm DropPath: zero whole samples with probability `rate`, rescale the rest by 1/(1-rate)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class InternViT(nnx.Module):
    """pixel_values [T, H, W, 3] → last hidden state [T, 1 + (H/p)(W/p), D] (raw output of the last layer)."""

    def __init__(self, cfg: InternViTConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 remat: bool = False, remat_policy: str = "full", attention_impl: str = "xla", rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.remat, self.remat_policy = remat, remat_policy
        d, p = cfg.hidden_size, cfg.patch_size
        std = cfg.initializer_range
        self.patch_embedding = nnx.Conv(
            cfg.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID", dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.with_partitioning(nnx.initializers.normal(std), (None, None, None, "embed")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)), rngs=rngs)
        self.class_embedding = nnx.Param(std * jax.random.normal(rngs.params(), (1, 1, d), param_dtype),
                                         out_sharding=(None, None, "embed"))
        self.position_embedding = nnx.Param(
            std * jax.random.normal(rngs.params(), (1, cfg.num_positions, d), param_dtype),
            out_sharding=(None, None, "embed"))

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> VisionBlock:
            return VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention_impl=attention_impl)

        self.layers = make_layers(rngs)

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        x = self.patch_embedding(pixel_values.astype(self.dtype))  # [T, h, w, D]
        t, h, w, d = x.shape
        if h * w + 1 != self.cfg.num_positions:
            raise ValueError(f"InternViT: pixel_values give a {h}x{w} patch grid but the position table is for "
                             f"{self.cfg.grid_size}x{self.cfg.grid_size}; resize position_embedding at load time")
        x = x.reshape(t, h * w, d)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (t, 1, d))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding[...].astype(x.dtype)

    def __call__(self, pixel_values: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """`rng` enables stochastic depth (drop_path_rate linspace over layers); None = deterministic."""
        x = self.embed(pixel_values)  # [T, N, D]
        x = constrain(x, ("batch", "seq", "embed"))  # tiles are the batch
        n_layers = self.cfg.num_hidden_layers
        graphdef, state = nnx.split(self.layers)
        rates = jnp.linspace(0.0, self.cfg.drop_path_rate, n_layers).astype(jnp.float32)
        use_drop = rng is not None and self.cfg.drop_path_rate > 0
        keys = jax.random.split(rng, n_layers) if use_drop else None

        def body(h, xs):
            layer_state, rate, key = xs
            block = nnx.merge(graphdef, layer_state)
            return block(h, rate, key if use_drop else None), None

        if self.remat:
            body = remat(body, self.remat_policy, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, (state, rates, keys if use_drop else jnp.zeros((n_layers,))))
        return x


def pixel_shuffle_v2(x: jax.Array, ratio: float = 0.5) -> jax.Array:
    """[T, h, w, C] → [T, h·r, w·r, C/r²] with out[i, j] = concat(x[2i,2j], x[2i,2j+1], x[2i+1,2j], x[2i+1,2j+1]).

    Equals InternVL's `pixel_shuffle` with ps_version 'v2' (spec §3).
    """
    s = int(round(1 / ratio))
    t, h, w, c = x.shape
    if h % s or w % s:
        raise ValueError(f"pixel_shuffle: grid {h}x{w} is not divisible by {s}")
    x = x.reshape(t, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(t, h // s, w // s, s * s * c)
