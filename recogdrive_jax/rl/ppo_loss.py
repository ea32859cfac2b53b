"""PPO loss pieces for the VLM policy with a value head (spec/virl.md §2 "Sequence log-prob", "Loss").

Sequence log-prob of a generated answer `out[0..L)`:

    logp = 0.5 · Σ_{i∈[2, m)} logp(out_i) + 1.0 · Σ_{i∈[m, L)} logp(out_i)

`m` is the first token of the last `"action":` key (the intended split, located by character offset in the
decoded text) or, in `reference_last5` mode (what the official code does in practice), L−5. `out_0` and
`out_1` get weight 0 (the official gather starts at out[1:] and the thought sum at index 1 of that), padding
(token id 0) gets 0. Build the weights on the host with `answer_token_weights`, then everything here is pure
and jittable. Token log-probs come from `models.layers.token_logprobs` (with its temperature).

Loss per sample (upstream `algo/ppo.py`, minibatch 1):

    ratio = exp(logp − logp_old)
    L_pi  = −min(ratio·A, clip(ratio, 1±ε)·A)        if ratio > ratio_cap: −clip(ratio)·A only
    V_c   = V_old + clip(V − V_old, ±ε_v);  L_v = 0.5·max((V−R)², (V_c−R)²)
    loss  = L_pi + c_v·L_v                            no entropy term; NaN logp samples are skipped
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

ACTION_KEY = '"action":'


def action_split_index(text: str, offsets: Sequence[tuple[int, int]], mode: str = "key") -> int:
    """Token index m where the action part starts. offsets[i] = (start, end) char span of output token i in
    `text` (HF `return_offsets_mapping` or cumulative decoded lengths). Falls back to last-5 when the key is
    absent (as upstream does when its pattern does not match)."""
    n = len(offsets)
    if mode not in ("key", "reference_last5"):
        raise ValueError(f"mode {mode!r}; expected 'key' or 'reference_last5'")
    if mode == "key":
        c = text.rfind(ACTION_KEY)
        if c >= 0:
            for i, (s, e) in enumerate(offsets):
                if e > c:                    # first token whose span reaches the key's opening quote
                    return i
    return max(n - 5, 0)


def answer_token_weights(text: str, offsets: Sequence[tuple[int, int]], token_ids: Sequence[int] | None = None, *,
                         mode: str = "key", thought_coef: float = 0.5, action_coef: float = 1.0,
                         length: int | None = None) -> np.ndarray:
    """[length] float32 weights over output token positions (0 beyond the answer). See module docstring."""
    n = len(offsets)
    length = n if length is None else length
    if length < n:
        raise ValueError(f"length {length} < number of output tokens {n}")
    m = action_split_index(text, offsets, mode)
    w = np.zeros(length, np.float32)
    w[2:m] = thought_coef
    w[max(m, 1):n] = action_coef      # position 0 never counts (upstream gathers out[1:])
    if token_ids is not None:
        ids = np.asarray(token_ids)[:n]
        w[:n] *= (ids != 0)
    return w


def offsets_from_pieces(pieces: Sequence[str]) -> list[tuple[int, int]]:
    """Char spans from per-token decoded strings (when a tokenizer gives no offset mapping)."""
    out, c = [], 0
    for p in pieces:
        out.append((c, c + len(p)))
        c += len(p)
    return out


def sequence_logprob(token_logp: jax.Array, weights: jax.Array) -> jax.Array:
    """[B, L] token log-probs × [B, L] weights → [B] weighted sequence log-prob."""
    return jnp.sum(jnp.where(weights != 0, token_logp * weights, 0.0), axis=-1)


def ppo_loss(new_logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, values: jax.Array,
             old_values: jax.Array, returns: jax.Array, *, clip_param: float = 0.1, value_clip: float = 0.1,
             value_coef: float = 0.5, ratio_cap: float = 10.0, use_clipped_value_loss: bool = True,
             sample_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """All inputs [B] → (scalar loss, metrics). Means are over valid samples (finite new_logp and mask)."""
    new_logp = jnp.asarray(new_logp, jnp.float32)
    valid = jnp.isfinite(new_logp)
    if sample_mask is not None:
        valid = valid & (jnp.asarray(sample_mask) > 0)
    vf = valid.astype(jnp.float32)
    n = jnp.maximum(vf.sum(), 1.0)
    log_ratio = jnp.where(valid, new_logp - old_logp, 0.0)
    ratio = jnp.exp(log_ratio)
    surr1 = ratio * advantages
    surr2 = jnp.clip(ratio, 1.0 - clip_param, 1.0 + clip_param) * advantages
    pi = jnp.where(ratio > ratio_cap, -surr2, -jnp.minimum(surr1, surr2))
    values = jnp.asarray(values, jnp.float32)
    v_err = (values - returns) ** 2
    if use_clipped_value_loss:
        v_clipped = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
        v_loss = 0.5 * jnp.maximum(v_err, (v_clipped - returns) ** 2)
    else:
        v_loss = 0.5 * v_err
    policy_loss = jnp.sum(jnp.where(valid, pi, 0.0)) / n
    value_loss = jnp.sum(jnp.where(valid, v_loss, 0.0)) / n
    loss = policy_loss + value_coef * value_loss
    metrics = {
        "loss": loss, "policy_loss": policy_loss, "value_loss": value_loss,
        "approx_kl": jnp.sum(vf * ((ratio - 1.0) - log_ratio)) / n,          # k3 estimator, ≥ 0
        "clip_fraction": jnp.sum(vf * (jnp.abs(ratio - 1.0) > clip_param)) / n,
        "ratio_mean": jnp.sum(vf * ratio) / n,
        "ratio_capped_fraction": jnp.sum(vf * (ratio > ratio_cap)) / n,
        "skipped_fraction": 1.0 - vf.mean(),
    }
    return loss, metrics


__all__ = ["action_split_index", "answer_token_weights", "offsets_from_pieces", "sequence_logprob", "ppo_loss",
           "ACTION_KEY"]
