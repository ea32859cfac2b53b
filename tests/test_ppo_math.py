"""PPO math: GAE vs a direct NumPy loop, loss pieces, token weights, value head."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import recogdrive_jax  # noqa: F401  (turns off eager sharding)
from recogdrive_jax.models.heads import ValueHead, last_prompt_index
from recogdrive_jax.models.layers import token_logprobs
from recogdrive_jax.rl.advantages import gae, normalize_advantages
from recogdrive_jax.rl.ppo_loss import (action_split_index, answer_token_weights, offsets_from_pieces, ppo_loss,
                                        sequence_logprob)


def _gae_numpy(r, v, term, trunc, gamma, lam, proper):
    """RolloutStorage.compute_returns(use_gae=True) transcribed: masks[t+1] = 1-done_t, bad_masks = 1-trunc_t."""
    T = len(r)
    masks = np.ones(T + 1)
    bad = np.ones(T + 1)
    masks[1:] = 1 - term
    bad[1:] = 1 - trunc
    ret = np.zeros(T)
    g = 0.0
    for t in reversed(range(T)):
        delta = r[t] + gamma * v[t + 1] * masks[t + 1] - v[t]
        g = delta + gamma * lam * masks[t + 1] * g
        if proper:
            g = g * bad[t + 1]
        ret[t] = g + v[t]
    return ret - v[:-1], ret


@pytest.mark.parametrize("proper", [False, True])
def test_gae_matches_numpy_loop(proper):
    rng = np.random.default_rng(0)
    T = 64
    r = rng.choice([1.0, -1.0, -1.5], size=T)
    v = rng.normal(size=T + 1)
    term = (rng.random(T) < 0.1).astype(np.float32)
    trunc = ((rng.random(T) < 0.1) & (term == 0)).astype(np.float32)
    adv_ref, ret_ref = _gae_numpy(r, v, term, trunc, 0.9, 0.95, proper)
    f = jax.jit(lambda *a: gae(*a, gamma=0.9, lam=0.95, cut_at_truncation=proper))
    adv, ret = f(r, v, term, trunc)
    np.testing.assert_allclose(adv, adv_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ret_ref, rtol=1e-5, atol=1e-5)
    # Batched over envs in trailing dims.
    adv2, _ = gae(np.stack([r, r], 1), np.stack([v, v], 1), np.stack([term, term], 1), np.stack([trunc, trunc], 1),
                  gamma=0.9, lam=0.95, cut_at_truncation=proper)
    np.testing.assert_allclose(adv2[:, 1], adv_ref, rtol=1e-5, atol=1e-5)


def test_normalize_advantages_torch_std():
    a = np.array([1.0, 2.0, 4.0, -3.0])
    np.testing.assert_allclose(normalize_advantages(a), (a - a.mean()) / (a.std(ddof=1) + 1e-5), rtol=1e-6)


def test_ppo_identity_ratio_and_zero_clip_fraction():
    rng = np.random.default_rng(1)
    B = 16
    lp = jnp.asarray(rng.normal(size=B) * 5 - 20)
    adv = jnp.asarray(rng.normal(size=B))
    v = jnp.asarray(rng.normal(size=B))
    ret = jnp.asarray(rng.normal(size=B))
    loss, m = jax.jit(ppo_loss)(lp, lp, adv, v, v, ret)
    assert float(m["ratio_mean"]) == pytest.approx(1.0)
    assert float(m["clip_fraction"]) == 0.0 and float(m["approx_kl"]) == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(m["policy_loss"], -adv.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["value_loss"], 0.5 * ((v - ret) ** 2).mean(), rtol=1e-6)
    np.testing.assert_allclose(loss, -adv.mean() + 0.5 * 0.5 * ((v - ret) ** 2).mean(), rtol=1e-6)


def test_ppo_clipping_cap_and_nan_skip():
    old = jnp.zeros(5)
    new = jnp.log(jnp.array([1.5, 0.5, 1.05, 20.0, jnp.nan]))
    adv = jnp.array([1.0, -1.0, 2.0, -1.0, 1.0])
    z = jnp.zeros(5)
    _, m = ppo_loss(new, old, adv, z, z, z, clip_param=0.1)
    # sample 0: min(1.5, 1.1)·1 → −1.1; 1: min(−0.5, −0.9) → 0.9; 2: unclipped −2.1; 3: ratio>10 → −clip·A = 1.1
    np.testing.assert_allclose(m["policy_loss"], (-1.1 + 0.9 - 2.1 + 1.1) / 4, rtol=1e-6)
    assert float(m["clip_fraction"]) == pytest.approx(3 / 4) and float(m["skipped_fraction"]) == pytest.approx(0.2)
    # Clipped value loss: V moved 1.0 from V_old=0 towards R=2 → clipped to 0.1, max picks the clipped error.
    _, m = ppo_loss(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.ones(1), jnp.zeros(1), 2 * jnp.ones(1))
    np.testing.assert_allclose(m["value_loss"], 0.5 * (0.1 - 2.0) ** 2, rtol=1e-6)
    g = jax.grad(lambda x: ppo_loss(x, old, adv, z, z, z)[0])(new)
    assert np.isfinite(np.asarray(g)).all()


def test_token_weights_key_and_reference_last5():
    pieces = ["\n{", '\n  "', "current", " observation", '":', ' "x",', '\n  "', "action", '":', ' "', "stop",
              "()", '",\n', "}", "<eos>"]
    text = "".join(pieces)
    offs = offsets_from_pieces(pieces)
    assert action_split_index(text, offs) == 6                 # token holding the quote of "action":
    w = answer_token_weights(text, offs, length=18)
    np.testing.assert_array_equal(w, [0, 0, .5, .5, .5, .5] + [1.0] * 9 + [0, 0, 0])
    w5 = answer_token_weights(text, offs, mode="reference_last5")
    np.testing.assert_array_equal(w5, [0, 0] + [.5] * 8 + [1.0] * 5)
    # No action key → upstream fallback (last 5); padding id 0 masked.
    w_nokey = answer_token_weights("abcdefgh", offsets_from_pieces(list("abcdefgh")),
                                   token_ids=[5, 6, 7, 8, 9, 10, 11, 0])
    np.testing.assert_array_equal(w_nokey, [0, 0, .5, 1, 1, 1, 1, 0])
    logp = jnp.log(jnp.full((1, 18), 0.5))
    np.testing.assert_allclose(sequence_logprob(logp, w[None]), (0.5 * 4 + 9) * np.log(0.5), rtol=1e-6)


def test_token_logprobs_temperature():
    logits = jnp.array([[[2.0, 0.0, -1.0]]])
    lp = token_logprobs(logits, jnp.array([[0]]), temperature=0.2)
    np.testing.assert_allclose(lp[0, 0], jax.nn.log_softmax(logits[0, 0] / 0.2)[0], rtol=1e-6)


def test_token_logprobs_gradient_is_onehot_minus_softmax():
    """The written-out VJP of `token_logprobs` against float64 onehot - softmax (and the temperature's chain rule),
    including a masked (-inf) logit, a row whose target holds the max, and bf16 logits."""
    g = np.random.default_rng(0)
    logits = g.normal(size=(2, 3, 11)).astype(np.float32) * 4
    logits[0, 1, 5] = -np.inf
    tgt = np.array([[3, 4, 0], [10, 7, 2]])
    logits[1, 0, 10] = logits[1, 0].max() + 1.0
    w = g.normal(size=(2, 3)).astype(np.float32)
    for temperature in (1.0, 0.7):
        got = jax.grad(lambda x: jnp.sum(w * token_logprobs(x, jnp.asarray(tgt), temperature)))(jnp.asarray(logits))
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        want = (np.eye(11)[tgt] - p) * w[..., None] / temperature
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
        assert np.asarray(got)[0, 1, 5] == 0.0
    lp16 = jax.grad(lambda x: jnp.sum(token_logprobs(x, jnp.asarray(tgt))))(jnp.asarray(logits, jnp.bfloat16))
    assert lp16.dtype == jnp.bfloat16


def test_value_head_shape_placement_and_init():
    D = 32
    head = ValueHead(D, rngs=nnx.Rngs(0))
    dims = [(l.kernel[...].shape, l.bias[...].shape) for l in head.layers]
    assert dims == [((D, 1024), (1024,)), ((1024, 512), (512,)), ((512, 1), (1,))]
    assert head.layers[0].kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert head.layers[0].bias.get_metadata()["out_sharding"] == ("mlp",)
    bound = 1 / np.sqrt(D)
    assert np.abs(np.asarray(head.layers[0].kernel[...])).max() <= bound
    hidden = jax.random.normal(jax.random.key(1), (3, 7, D))
    P = jnp.array([2, 7, 5])
    vals = nnx.jit(lambda m, h, i: m(h, i))(head, hidden, last_prompt_index(P))
    assert vals.shape == (3,) and vals.dtype == jnp.float32
    expect = jnp.stack([head.from_hidden(hidden[b, int(P[b]) - 1][None])[0] for b in range(3)])
    np.testing.assert_allclose(vals, expect, rtol=1e-5, atol=1e-6)
    # Only the selected position matters.
    hidden2 = hidden.at[0, 3:].set(100.0)
    np.testing.assert_allclose(head(hidden2, last_prompt_index(P))[0], vals[0], rtol=1e-6)


def test_nav_compare_table_mean_and_sd(tmp_path):
    import json
    import os
    from recogdrive_jax.eval import nav_compare

    def write(run, acc):
        for split in ("in_distribution", "rule_ood"):
            d = tmp_path / run / "eval_nav" / split
            os.makedirs(d)
            json.dump({"per_step_accuracy": acc, "success_rate": 0.0, "mean_reward": 0.0, "num_routes": 48},
                      open(d / "metrics.json", "w"))
    write("a0", 0.2), write("a1", 0.4), write("b", 0.5)
    text = nav_compare.table([("A", [str(tmp_path / "a0"), str(tmp_path / "a1")]), ("B", [str(tmp_path / "b")])])
    rows = [line for line in text.splitlines() if line.startswith("| A") or line.startswith("| B")]
    assert rows[0].startswith("| A | 2 | 30.0 ± 14.1 | 0.0 ± 0.0 |") and rows[1].startswith("| B | 1 | 50.0 | 0.0 |")
    assert "in_distribution 48" in text
    assert nav_compare.main(["A=" + str(tmp_path / "missing")]) == 2
    for bad in ("A", "A="):  # no '=', no path: one error line, not a traceback or an empty row
        assert nav_compare.main([bad]) == 2


def test_unknown_model_field_override_names_the_key():
    import ml_collections
    import pytest
    from recogdrive_jax.errors import UserError
    from recogdrive_jax.rl import ppo as ppo_lib
    bad = ml_collections.ConfigDict(dict(variant="tiny", llm=dict(vocab_sise=8), vit={}))
    with pytest.raises(UserError, match=r"config.model.llm: unknown field\(s\) \['vocab_sise'\]"):
        ppo_lib.vlm_config(bad)
    ok = ppo_lib.vlm_config(ml_collections.ConfigDict(dict(variant="tiny", llm=dict(vocab_size=1024), vit={})))
    assert ok.llm_config.vocab_size == 1024
