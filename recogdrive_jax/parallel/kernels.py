"""Which kernel a model's `attention_impl = 'auto'` means on the backend it is traced for.

Models never mention devices (CONTRIBUTING): `models/layers.dot_product_attention` asks this module, at trace time,
what 'auto' resolves to. cuDNN's fused (flash) attention is taken only where it exists and applies: a GPU backend
and a half-precision compute dtype (cuDNN has no fp32 flash kernel); everything else keeps the einsum path, which
was measured as fast as or faster than `jax.nn.dot_product_attention(implementation='xla')` on CPU
(bench/attention.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("auto", "xla", "jax_nn", "cudnn")
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def attention_impl(requested: str, dtype) -> str:
    """'auto' -> 'cudnn' on a GPU backend with a bf16/fp16 compute dtype, else 'xla'; any other name unchanged."""
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {requested!r}; expected one of {ATTENTION_IMPLS}")
    if requested != "auto":
        return requested
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in _HALF:
        return "cudnn"
    return "xla"
