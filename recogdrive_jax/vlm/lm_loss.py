"""The SFT language-model loss: next-token CE on assistant tokens, chunked over the sequence so the [T, vocab]
logits are never materialised at once; packing-safe (segment-masked causal attention)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from recogdrive_jax.models.layers import token_logprobs
from recogdrive_jax.parallel.activations import constrain

_KEEP_LOGITS = True  # one fp32 chunk keeps its logits for the backward (False: the full remat; tests compare both)


def segment_mask(segment_ids):
    """segment_ids [B, T] (0 = pad) → causal mask [B, T, T] within each segment (packing-safe)."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same & (segment_ids[:, None, :] > 0)


def chunked_ce(lm, hidden, labels, chunk: int):
    """Next-token CE over labels != -100 without the full [B, T, V] logits: scans T in chunks (each
    rematerialised in the backward). hidden [B, T, D], labels [B, T]. Returns (nll_sum, correct, count).

    One chunk (T <= chunk, or T not a multiple of it) at fp32 is not rematerialised: its logits are kept for the
    backward (`token_logprobs` keeps only them), since the CE ends the forward and its backward starts the backward
    pass, the saved [B, T, V] logits live no longer than recomputed ones would; recomputing would only add a [T, D] x
    [D, V] matmul (17 % of an SFT step's FLOPs at InternVL3-1B widths, 2 x 532 tokens; bench/RESULTS.md) for no
    saving in peak memory. (A `jax.checkpoint` saving the logits by name did the same but copied them once more:
    JAX guards every remat residual with a `reduce_precision`, a [B, T, V] pass of its own.) In bf16 compute the
    full remat stays: there the saved logits moved some gradients by one bf16 ulp, a change not made silently.
    """
    b, t, d = hidden.shape
    tgt = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), -100, labels.dtype)], axis=1)  # [B, T]
    c = chunk if (chunk and t % chunk == 0) else t
    hs = hidden.reshape(b, t // c, c, d).swapaxes(0, 1)  # [n, B, c, D]
    ts = tgt.reshape(b, t // c, c).swapaxes(0, 1)

    def one(h, y):
        logits = constrain(lm.logits(h), ("batch", "seq", "vocab"))  # [B, c, V] fp32
        valid = y != -100
        yy = jnp.where(valid, y, 0)
        lp = token_logprobs(logits, yy)
        correct = (jnp.argmax(logits, axis=-1) == yy) & valid
        return -jnp.sum(jnp.where(valid, lp, 0.0)), jnp.sum(correct), jnp.sum(valid)

    def body(acc, xs, fn=jax.checkpoint(one)):
        out = fn(*xs)
        return tuple(a + o.astype(a.dtype) for a, o in zip(acc, out)), None

    zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    if _KEEP_LOGITS and t // c == 1 and hidden.dtype == jnp.float32:
        return body(zero, (hs[0], ts[0]), one)[0]
    (nll, correct, count), _ = jax.lax.scan(body, zero, (hs, ts))
    return nll, correct, count


def forward_sums(model, batch, rng, *, chunk: int, drop_path: bool):
    """Model forward on a collated batch (data/length_grouping.py) → (nll_sum, correct, count).

    The tiles [G, N, S, S, 3] / image_flags [G, N] are flattened to one ViT batch of G·N tiles: the batch's real
    tiles packed flat into tile groups (or one group a row); either way the real tiles come in row order, as
    `merge_image_embeds` consumes them."""
    g, n = batch["image_flags"].shape
    pv = batch["pixel_values"]
    pv = pv.reshape(g * n, *pv.shape[2:]).astype(model.dtype)
    emb, _ = model.embed_inputs(batch["input_ids"], pv, batch["image_flags"].reshape(-1),
                                rng=rng if drop_path else None)
    hidden, _ = model.language_model.model(emb, batch["positions"], segment_mask(batch["segment_ids"]))
    return chunked_ce(model.language_model, hidden, batch["labels"], chunk)


def make_loss_fn(mdef, *, chunk: int, drop_path: bool, grad_accum: int):
    def loss_fn(params, batch, rng):
        nll, correct, count = forward_sums(mdef.bind(params), batch, rng, chunk=chunk, drop_path=drop_path)
        n = jnp.maximum(count, 1).astype(jnp.float32)
        # `tokens`: real (non-pad) tokens of the whole optimizer step (the loop averages micro-batch metrics).
        tokens = jnp.sum(batch["attention_mask"]).astype(jnp.float32) * grad_accum
        return nll / n, {"token_acc": correct / n, "tokens": tokens,
                         "label_tokens": count.astype(jnp.float32) * grad_accum}
    return loss_fn
