"""`layers.flat_dot_general` (every `layers.dense`): a dense layer's [..., D] x [D, N] product on flattened rows.

Forward and gradients must be bitwise those of `lax.dot_general` on the unflattened input (the change is a layout
for XLA, not new math), the kernel gradient must become one plain GEMM (the reason for it: bench/RESULTS.md, ninth
session), other products must pass through unchanged, and a sharded batch / kernel must give one device's result."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from recogdrive_jax.models import layers


def _pair(dtype=jnp.float32):
    flat = layers.dense(24, 40, ("embed", "mlp"), rngs=nnx.Rngs(0), dtype=dtype)
    plain = nnx.Linear(24, 40, dtype=dtype, rngs=nnx.Rngs(1))
    nnx.update(plain, nnx.state(flat, nnx.Param))
    return flat, plain


def _value_and_grads(layer, x, g):
    def f(state, x):
        return nnx.merge(graphdef, state)(x)
    graphdef, state = nnx.split(layer)
    y, vjp = jax.vjp(f, state, x)
    return y, vjp(g)


def test_forward_and_gradients_are_bitwise_the_unflattened_product():
    r = np.random.default_rng(0)
    for shape in [(3, 5, 24), (2, 3, 4, 24), (7, 24)]:
        x = jnp.asarray(r.normal(size=shape).astype(np.float32))
        g = jnp.asarray(r.normal(size=shape[:-1] + (40,)).astype(np.float32))
        flat, plain = _pair()
        got = _value_and_grads(flat, x, g)
        want = _value_and_grads(plain, x, g)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_compute_keeps_its_dtype_and_values():
    flat, plain = _pair(jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 24)), jnp.float32)
    y = flat(x)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 9, 40)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(plain(x), np.float32))


def test_the_kernel_gradient_is_one_gemm_over_the_rows():
    """The unflattened product's kernel gradient contracts two axes (B and T); the flattened one contracts one."""
    x, w, g = jnp.ones((4, 6, 24)), jnp.ones((24, 40)), jnp.ones((4, 6, 40))
    dn = (((2,), (0,)), ((), ()))

    def kernel_grad(dot):
        return jax.vjp(lambda w: dot(x, w, dn), w)[1](g)[0]

    def contracted(f):
        hlo = jax.jit(f).lower().as_text()
        return sorted({len(m.split(",")) for m in re.findall(r"contracting_dims = \[([\d, ]+)\] x", hlo)})

    assert contracted(lambda: kernel_grad(jax.lax.dot_general)) == [2]
    assert contracted(lambda: kernel_grad(layers.flat_dot_general)) == [1]


def test_other_products_pass_through_unchanged():
    r = np.random.default_rng(2)
    a = jnp.asarray(r.normal(size=(3, 5, 8)).astype(np.float32))
    b = jnp.asarray(r.normal(size=(3, 8, 4)).astype(np.float32))
    batched = (((2,), (1,)), ((0,), (0,)))  # a batched product: not a dense layer's
    np.testing.assert_array_equal(layers.flat_dot_general(a, b, batched), jax.lax.dot_general(a, b, batched))
    lead = (((0,), (0,)), ((), ()))  # contracting the leading axis
    c = jnp.asarray(r.normal(size=(3, 7)).astype(np.float32))
    np.testing.assert_array_equal(layers.flat_dot_general(a, c, lead), jax.lax.dot_general(a, c, lead))


def test_sharded_rows_and_kernel_equal_one_device():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    r = np.random.default_rng(3)
    x = jnp.asarray(r.normal(size=(4, 6, 24)).astype(np.float32))
    w = jnp.asarray(r.normal(size=(24, 40)).astype(np.float32))
    g = jnp.asarray(r.normal(size=(4, 6, 40)).astype(np.float32))
    dn = (((2,), (0,)), ((), ()))

    def f(x, w):
        y, vjp = jax.vjp(lambda x, w: layers.flat_dot_general(x, w, dn), x, w)
        return (y, *vjp(g))

    want = jax.jit(f)(x, w)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None, None)))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "tensor")))
    got = jax.jit(f)(xs, ws)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
