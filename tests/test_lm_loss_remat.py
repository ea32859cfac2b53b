"""lm_loss.chunked_ce with one chunk keeps its logits for the backward (no recomputed vocab matmul, no remat's
residual copy) and equals the full-remat result at fp32 (the bench/RESULTS.md SFT profile findings).

Not bitwise since the CE's gradient is written out (`layers.token_logprobs`): with the logits kept, XLA computes
exp(logits - max) once for the forward's sum and the backward; under the full remat the forward and the recomputed
backward each compute it in their own fusion, and the two round some entries an ulp apart. The loss is bitwise; each
gradient agrees to 1e-6 of its largest entry (~8 fp32 ulps; measured ≤ 2)."""
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


def _grad_and_vocab_dots(monkeypatch, keep: bool):
    monkeypatch.setattr(lm_loss, "_KEEP_LOGITS", keep)  # False = the full remat (the old behaviour)
    cfg = iv.get_config("tiny")
    mdef = vlm_ckpt.module_def(cfg, "float32")
    params = mdef.init(jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, bench_sft.make_batch(cfg, 2, 64, "2,1"))
    f = jax.jit(jax.value_and_grad(lm_loss.make_loss_fn(mdef, chunk=2048, drop_path=False, grad_accum=1),
                                   has_aux=True))
    compiled = f.lower(params, batch, jax.random.key(1)).compile()
    v = cfg.llm_config.vocab_size
    dots = len(re.findall(rf"= f32\[[\d,]*\b{v}\b[\d,]*\][^ ]* dot\(", compiled.as_text()))
    vocab_copies = len(re.findall(rf"= f32\[[\d,]*\b{v}\b[\d,]*\][^ ]* reduce-precision\(", compiled.as_text()))
    return jax.device_get(compiled(params, batch, jax.random.key(1))), dots, vocab_copies


def test_single_chunk_saves_logits_and_is_bitwise_the_full_remat(monkeypatch):
    saved, saved_dots, saved_copies = _grad_and_vocab_dots(monkeypatch, True)
    full, full_dots, _ = _grad_and_vocab_dots(monkeypatch, False)
    assert saved_dots == full_dots - 1  # the forward's [T, V] logits are not recomputed
    assert saved_copies == 0  # nor copied (a remat residual's reduce_precision)
    (loss_s, aux_s), grads_s = saved
    (loss_f, aux_f), grads_f = full
    np.testing.assert_array_equal(loss_s, loss_f)
    for a, b in zip(jax.tree.leaves(aux_s), jax.tree.leaves(aux_f)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_f)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(np.max(np.abs(b))))
