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

'chunked' (models/layers._chunked_attention): the einsum path over blocks of query rows, so a block's logits stay in
cache. Measured interleaved on CPU, one core, loaded machine (2026-12-07, so indicative), against jax.nn's XLA path
for fp32 grouped-query attention: 2.0x (1B prefill, 1,064 tokens, 14/2 heads x 64) and 2.9x (the PPO bench's
scoring pass, 4 x 1,048 tokens, 4/2 heads x 16) forward; 1.1x and 1.4x forward + backward. Multi-head attention
(the ViT: 3 x 1,025 tokens, 16 heads x 64) was 0.3-0.6x of the einsum path in query blocks, so 'auto' keeps it
there under differentiation; its forward one (batch row, head) at a time is 2.0x the einsum path ('per_head':
prefill, generate, the hidden-state cache; 194 vs 395 ms a ViT layer, one core, CPU time, loaded machine).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("auto", "xla", "jax_nn", "cudnn", "chunked", "per_head")
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# 'chunked': the query rows per block are sized so one block's fp32 logits [B, H, rows, S] take about this much
# (the CPU's L2/L3 share; 1-4 MiB measured equally good at the PPO and 1B-prefill shapes)
CHUNK_LOGIT_BYTES = 2 << 20
MIN_CHUNK_ROWS = 8
# Products with at most this many rows (a decode step's LM head) run as one matrix-vector product a row
# (models/layers.matvec_rows): XLA's CPU matvec streams the weight once, its GEMM packs it first. Two rows: 40 vs
# 58 ms for the 1B LM head (one core, CPU time); three would read the weight three times and lose to the GEMM.
MATVEC_MAX_ROWS = 2
# 'per_head' (models/layers._per_head_attention): fp32 multi-head attention over at least this many queries runs its
# forward one (batch row, head) at a time when no gradient is taken (the ViT at 1,025 tokens: 2.0x the einsum path);
# the DiT's few-token self-attention stays on the einsum path (not measured faster there)
PER_HEAD_MIN_QUERIES = 256


def matvec_rows(rows: int) -> bool:
    """Whether a product with `rows` rows against a large weight should run as per-row matvecs: on CPU only (a GPU
    GEMM does not pack its operand this way; nothing measured there)."""
    return jax.default_backend() == "cpu" and rows <= MATVEC_MAX_ROWS


def attention_chunk_rows(batch: int, heads: int, keys: int) -> int:
    """Query rows per 'chunked' block: the largest power of two whose fp32 logits fit CHUNK_LOGIT_BYTES, ≥ 8."""
    fit = CHUNK_LOGIT_BYTES // max(1, 4 * batch * heads * keys)
    return max(MIN_CHUNK_ROWS, 1 << max(0, fit.bit_length() - 1))


def attention_impl(requested: str, dtype, *, grouped: bool = False, queries: int | None = None) -> str:
    """'auto' -> 'cudnn' on a GPU backend with a bf16/fp16 compute dtype; on CPU, fp32 grouped-query attention
    (`grouped`: fewer key/value than query heads) over more than 2 * MIN_CHUNK_ROWS `queries` (prefill, scoring,
    training; not a decode step) -> 'chunked'; other fp32 grouped-query attention (decode, or a GPU) -> 'jax_nn';
    fp32 multi-head attention on CPU over ≥ PER_HEAD_MIN_QUERIES queries (the ViT) -> 'per_head' (its forward per
    (batch row, head) where no gradient is taken; exactly the einsum path under differentiation); the rest -> 'xla'
    (the einsum path). Any other name unchanged."""
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {requested!r}; expected one of {ATTENTION_IMPLS}")
    if requested != "auto":
        return requested
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in _HALF:
        return "cudnn"
    if jnp.dtype(dtype) != jnp.dtype(jnp.float32):
        return "xla"
    if not grouped:
        cpu_many = jax.default_backend() == "cpu" and queries is not None and queries >= PER_HEAD_MIN_QUERIES
        return "per_head" if cpu_many else "xla"
    if jax.default_backend() == "cpu" and queries is not None and queries > 2 * MIN_CHUNK_ROWS:
        return "chunked"
    return "jax_nn"
