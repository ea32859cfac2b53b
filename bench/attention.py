"""Attention kernel choice on CPU (issue 17, deliverable 4): this project's einsum path (`attention_impl='xla'`) vs
`jax.nn.dot_product_attention`'s XLA path (`'jax_nn'`), interleaved in one process at the anchor shapes.

    .venv/bin/python bench/attention.py [--reps 5] [--dtype float32|bfloat16]

Baseline = the einsum path, "jax" side = jax.nn: a ratio > 1 means jax.nn is faster. Cases: the planner's IL train
step (DiT small, batch 16, vl_len 256: attention inside the whole step), and the attention op alone, forward +
backward, at InternVL3-1B widths: ViT (3 tiles x 1025 tokens, 16 heads x 64), LLM prefill (1064 tokens, 14 query /
2 kv heads x 64, causal), and a decode step (forward only, 1 query over a 2048-slot cache). Last case: the ViT's
forward with `'per_head'` (one (batch row, head) at a time, what 'auto' runs where no gradient is taken) as the
"jax" side against the einsum path.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402

common.single_thread()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from recogdrive_jax.models import layers  # noqa: E402
from recogdrive_jax.models.planner import build_planner, planner_config  # noqa: E402


def _op_case(name, b, t, s, h, g, hd, dtype, reps, *, causal=False, grad=True, impls=("xla", "jax_nn")):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, h, hd)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(b, s, g, hd)), dtype) for _ in range(2))
    mask = jnp.tril(jnp.ones((t, s), bool), k=s - t)[None] if causal else None

    def make(impl):
        def f(q, k, v):
            return layers.dot_product_attention(q, k, v, mask, impl=impl)
        fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
                     if grad else f)
        return lambda: jax.block_until_ready(fn(q, k, v))

    return common.interleaved(name, make(impls[0]), make(impls[1]), reps=reps)


def _planner_case(dtype, reps):
    cfg = planner_config("small", vlm_size="small", dtype=dtype)
    rng = np.random.default_rng(0)
    b, length = 16, 256
    batch = {"cond": {"vl_states": jnp.asarray(rng.normal(size=(b, length, cfg.vl_dim)), jnp.float32),
                      "status": jnp.asarray(rng.normal(size=(b, 8)), jnp.float32),
                      "history": jnp.asarray(rng.normal(size=(b, 4, 3)), jnp.float32)},
             "future": jnp.asarray(rng.normal(size=(b, 8, 3)), jnp.float32)}

    def make(impl):
        model = build_planner(cfg.replace(attention_impl=impl), nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        step = jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s).loss(batch, jax.random.key(0))[0]))
        return lambda: jax.block_until_ready(step(state))

    return common.interleaved("planner small IL step (B16, vl 256)", make("xla"), make("jax_nn"), reps=reps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args(argv)
    dt = jnp.dtype(a.dtype)
    print(f"# attention: einsum path (baseline) vs jax.nn xla ('jax'), {a.dtype}, {common.load_average()}")
    timings = [
        _planner_case(a.dtype, a.reps),
        _op_case("ViT attention fwd+bwd (3x1025, 16x64)", 3, 1025, 1025, 16, 16, 64, dt, a.reps),
        _op_case("LLM prefill attention fwd+bwd (1064, 14/2x64, causal)", 1, 1064, 1064, 14, 2, 64, dt, a.reps,
                 causal=True),
        _op_case("LLM decode attention fwd (1 over 2048, 14/2x64)", 1, 1, 2048, 14, 2, 64, dt, a.reps, grad=False),
        _op_case("ViT attention fwd, 'per_head' as 'jax' side (3x1025, 16x64)", 3, 1025, 1025, 16, 16, 64, dt,
                 a.reps, grad=False, impls=("xla", "per_head")),
    ]
    for t in timings:
        t.print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
