"""bench/planner.py --profile's FLOP audit: `hlo_dots` finds every dot of a compiled module, with its FLOPs and the
trip count of the while loop around it (a `lax.scan`), and `planner_part` sorts products by operand shape."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_hlo_dots_counts_flops_and_loop_trip_counts():
    from bench.planner import hlo_dots

    def f(x, ws, v):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)  # 3 x [4, 8] @ [8, 8]
        return jnp.einsum("bij,bjk->bik", v, v) + 0 * h.sum()  # one batched [2, 5, 5] product outside

    args = (jnp.ones((4, 8)), jnp.ones((3, 8, 8)), jnp.ones((2, 5, 5)))
    dots = hlo_dots(jax.jit(f).lower(*args).compile().as_text())
    total = sum(d["flops"] * d["mult"] for d in dots)
    assert total == 3 * 2 * 4 * 8 * 8 + 2 * 2 * 5 * 5 * 5
    assert sorted(d["mult"] for d in dots) == [1, 3]
    batched = next(d for d in dots if d["mult"] == 1)
    assert batched["dims"] == ((2,), (1,), (0,), (0,))  # contracting, then batch dims of lhs / rhs


def test_planner_part_sorts_the_products_by_shape():
    from bench.planner import planner_part
    from recogdrive_jax.models.planner import planner_config
    cfg = planner_config("small")  # D 384, Hv 3584
    b, n = 16, 256
    assert planner_part([(4096, 3584), (3584, 384)], cfg, b, n).startswith("VL projection")
    assert planner_part([(4096, 384), (384, 384)], cfg, b, n).startswith("memory K/V")
    assert planner_part([(16, 8, 8, 48), (16, 8, 256, 48)], cfg, b, n).startswith("cross-attention products")
    assert planner_part([(128, 384), (384, 384)], cfg, b, n).startswith("rest")
    kv = 2 * b * n * 384 * 384  # one [B*L, D] x [D, D] product
    assert planner_part([(b * n, 384), (384, 384)], cfg, b, n, kv).startswith("memory K/V")
    p_m = 2 * b * 64 * n * 384  # the folded cross-attention's probabilities x memory
    assert planner_part([(b, 64, n), (b, n, 384)], cfg, b, n, p_m).startswith("cross-attention products")
