"""lm_loss.chunked_ce with one chunk saves its logits for the backward (no recomputed vocab matmul) and is bitwise
the full-remat result at fp32 (the bench/RESULTS.md SFT profile finding)."""
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import sft as bench_sft  # noqa: E402  (the SFT benchmark's batch maker)
from recogdrive_jax.models import internvl as iv  # noqa: E402
from recogdrive_jax.vlm import checkpoint as vlm_ckpt  # noqa: E402
from recogdrive_jax.vlm import lm_loss  # noqa: E402


def _grad_and_vocab_dots(monkeypatch, policy):
    monkeypatch.setattr(lm_loss, "_SAVE_LOGITS", policy)  # None = the full remat (the old behaviour)
    cfg = iv.get_config("tiny")
    mdef = vlm_ckpt.module_def(cfg, "float32")
    params = mdef.init(jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, bench_sft.make_batch(cfg, 2, 64, "2,1"))
    f = jax.jit(jax.value_and_grad(lm_loss.make_loss_fn(mdef, chunk=2048, drop_path=False, grad_accum=1),
                                   has_aux=True))
    compiled = f.lower(params, batch, jax.random.key(1)).compile()
    v = cfg.llm_config.vocab_size
    dots = len(re.findall(rf"= f32\[[\d,]*\b{v}\b[\d,]*\][^ ]* dot\(", compiled.as_text()))
    return jax.device_get(compiled(params, batch, jax.random.key(1))), dots


def test_single_chunk_saves_logits_and_is_bitwise_the_full_remat(monkeypatch):
    saved, saved_dots = _grad_and_vocab_dots(monkeypatch, lm_loss._SAVE_LOGITS)
    full, full_dots = _grad_and_vocab_dots(monkeypatch, None)
    assert saved_dots == full_dots - 1  # the forward's [T, V] logits are not recomputed
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(full)):
        np.testing.assert_array_equal(a, b)
