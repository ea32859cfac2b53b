"""Which kernel a model's `attention_impl = 'auto'` means on the backend it is traced for.

Models never mention devices (CONTRIBUTING): `models/layers.dot_product_attention` asks this module, at trace time,
what 'auto' resolves to. cuDNN's fused (flash) attention where it exists and applies: a GPU backend and a
half-precision compute dtype (cuDNN has no fp32 flash kernel). Elsewhere the faster of the two XLA paths measured on
CPU (bench/attention.py, interleaved, 2026-12-07, loaded machine so indicative): grouped-query attention (fewer
key/value than query heads: Qwen2) in fp32 through `jax.nn.dot_product_attention`'s XLA path, 1.4-1.5x faster
than the 5-D einsum at the 1B prefill; everything else through this project's einsum path: multi-head attention (the
ViT, the DiT), which jax.nn matched at best (ViT 0.6-0.8x, planner IL step 0.7-1.0x), and any bf16 compute, where
jax.nn's backward feeds its fp32 logit gradients to a dot (an fp32 operand: the mixed-precision policy of
tests/test_mixed_precision.py wants bf16 operands in every dot) although it too was 1.4x faster at the bf16 prefill.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("auto", "xla", "jax_nn", "cudnn")
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def attention_impl(requested: str, dtype, *, grouped: bool = False) -> str:
    """'auto' -> 'cudnn' on a GPU backend with a bf16/fp16 compute dtype, else 'jax_nn' for fp32 grouped-query
    attention (`grouped`: fewer key/value heads than query heads) and 'xla' (the einsum path) for the rest; any other
    name unchanged."""
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {requested!r}; expected one of {ATTENTION_IMPLS}")
    if requested != "auto":
        return requested
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in _HALF:
        return "cudnn"
    return "jax_nn" if grouped and jnp.dtype(dtype) == jnp.dtype(jnp.float32) else "xla"
