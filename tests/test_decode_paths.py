"""The decode-speed paths of issue 17 compute what the plain paths compute: per-layer weights sliced once before a
decode loop (`Qwen2Model.layer_states`) give the scanned stack's cache and logits (XLA may fuse the unrolled layers
differently: equal up to fp32 rounding, 1e-6; bitwise at the 1B anchor), and the
per-row matrix-vector LM head (`layers.matvec_rows`, ≤ `kernels.MATVEC_MAX_ROWS` rows) equals the dot up to
rounding. Tiny shapes; the greedy-token parity with transformers is tests/test_internvl_parity.py."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from recogdrive_jax.models import internvl as iv
from recogdrive_jax.models import layers
from recogdrive_jax.models.layers import matvec_rows
from recogdrive_jax.parallel import kernels


def _model():
    return iv.init_model(iv.get_config("tiny"), seed=3)


def test_layer_states_decode_equals_the_scanned_decode():
    model = _model()
    ids = jnp.array([[1, 20, 21, 22, 23], [1, 30, 31, 0, 0]])
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    cache, _ = jax.jit(lambda c: iv.prefill(model, c, ids, mask))(iv.init_cache(model.cfg, 2, 9))
    assert len(model.language_model.model.layer_states()) == model.cfg.llm_config.num_hidden_layers

    @functools.partial(jax.jit, static_argnums=1)
    def three_steps(cache, hoisted: bool):
        ls = model.language_model.model.layer_states() if hoisted else None
        out = []
        for tok in (jnp.array([40, 50]), jnp.array([41, 51]), jnp.array([42, 52])):
            cache, lg = iv.decode_step(model, cache, tok, ls)
            out.append(lg)
        return cache, jnp.stack(out)

    (ca, la), (cb, lb) = three_steps(cache, False), three_steps(cache, True)
    for key in ("key_valid", "index", "next_pos"):
        np.testing.assert_array_equal(np.asarray(ca[key]), np.asarray(cb[key]), err_msg=key)
    for key in ("k", "v"):
        np.testing.assert_allclose(np.asarray(ca[key]), np.asarray(cb[key]), atol=1e-6, rtol=0, err_msg=key)
    np.testing.assert_allclose(np.asarray(la), np.asarray(lb), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.argmax(np.asarray(la), -1), np.argmax(np.asarray(lb), -1))


def test_matvec_rows_equals_the_dot_and_logits_pick_it_for_few_rows():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((64, 300)), jnp.float32)
    for shape in ((1, 64), (2, 64), (2, 1, 64)):
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        np.testing.assert_allclose(np.asarray(jax.jit(matvec_rows)(x, w)), np.asarray(x @ w), atol=1e-5, rtol=0)
    lm = _model().language_model
    assert kernels.MATVEC_MAX_ROWS == 2
    for rows in (1, 2, 3):  # ≤ 2 rows: the matvecs (equal up to rounding); 3: the dense layer itself (exact)
        h = jnp.asarray(rng.standard_normal((rows, lm.cfg.hidden_size)), jnp.float32)
        got, ref = np.asarray(lm.logits(h)), np.asarray(lm.lm_head(h))
        assert got.shape == (rows, lm.cfg.vocab_size) and got.dtype == np.float32
        if rows > kernels.MATVEC_MAX_ROWS:
            np.testing.assert_array_equal(got, ref)
        else:
            np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_first_argmax_is_argmax_with_its_ties_nans_and_infinities():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 3, 1000)), jnp.float32)
    x = x.at[0, 0, 7].set(9.0).at[0, 0, 3].set(9.0)  # a tie: the first wins
    x = x.at[1, 2, 500].set(jnp.nan).at[1, 2, 900].set(jnp.nan)  # NaN: the first NaN, as jnp.argmax
    x = x.at[2, 1].set(-jnp.inf)  # all -inf: index 0
    x = x.at[3, 0, 999].set(jnp.inf)
    got = jax.jit(layers.first_argmax)(x)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(x, axis=-1)))
