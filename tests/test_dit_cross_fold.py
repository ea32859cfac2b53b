"""The DiT's reassociated cross-attention (`dit.cross_attention_folded`: key norm folded into the queries, value
projection after the attention) equals the attention module's own path: outputs and every gradient, with a key mask
that leaves one row fully masked; bf16 keeps the module's path."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recogdrive_jax.models.dit import DiTBlock, cross_attention_folded
from recogdrive_jax.models.layers import Attention, rope_cos_sin


def _attention(dtype=jnp.float32):
    attn = Attention(32, 4, 8, context_dim=32, rngs=nnx.Rngs(0), dtype=dtype)
    g = np.random.default_rng(1)
    state = nnx.state(attn, nnx.Param)  # non-trivial norm weights and biases
    nnx.update(attn, jax.tree.map(lambda p: jnp.asarray(g.normal(size=p.shape) * 0.3 + (p.ndim == 1), p.dtype),
                                  state))
    return attn


def test_folded_cross_attention_equals_the_module_path_with_gradients():
    attn = _attention()
    g = np.random.default_rng(0)
    x, mem = (jnp.asarray(g.normal(size=s).astype(np.float32)) for s in [(3, 8, 32), (3, 11, 32)])
    mask = jnp.asarray(g.random((3, 11)) > 0.4).at[1].set(False).at[2].set(True)  # row 1 fully masked
    rope = rope_cos_sin(jnp.arange(8), 8)
    cot = jnp.asarray(g.normal(size=(3, 8, 32)).astype(np.float32))
    graphdef, params = nnx.split(attn)

    def loss(params, x, mem, folded):
        a = nnx.merge(graphdef, params)
        out = cross_attention_folded(a, x, mem, rope, mask) if folded else a(x, mem, rope=rope, mask=mask)
        return jnp.sum(out * cot), out

    (_, ref), ref_g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, mem, False)
    (_, got), got_g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, mem, True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(ref_g), jax.tree.leaves(got_g)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-5)


def test_bf16_and_the_block_switch_keep_the_module_path():
    attn = _attention(jnp.bfloat16)
    x, mem = jnp.ones((1, 8, 32), jnp.bfloat16), jnp.ones((1, 5, 32), jnp.bfloat16)
    assert cross_attention_folded(attn, x, mem, rope_cos_sin(jnp.arange(8), 8)) is None
    blk = DiTBlock(32, 4, 8, cross_attention=True, rngs=nnx.Rngs(0))
    assert blk.fold_cross
    g = np.random.default_rng(2)
    u, c, m = (jnp.asarray(g.normal(size=s).astype(np.float32)) for s in [(2, 8, 32), (2, 32), (2, 6, 32)])
    nnx.update(blk, jax.tree.map(lambda p: p + 0.1, nnx.state(blk, nnx.Param)))  # adaLN gates not zero
    rope = rope_cos_sin(jnp.arange(8), 8)
    folded = blk(u, c, m, rope=rope)
    blk.fold_cross = False
    np.testing.assert_allclose(np.asarray(blk(u, c, m, rope=rope)), np.asarray(folded), atol=2e-5, rtol=1e-6)
