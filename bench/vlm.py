"""Prefill and decode throughput of the Flax InternVL port vs transformers (PyTorch) on the same small config.

Both run in this process on the same weights (converted from the torch model) at fp32:
* prefill: a [B, T] prompt with one image tile per row, through the ViT, mlp1 and the LLM, filling the cache;
* decode: N greedy steps with the KV cache (JAX: jitted `lax.while_loop` generate minus its prefill;
  PyTorch: the forward-with-cache loop that `generate` runs).
Prints `vlm_prefill_jax_vs_torch: 2.1x` and `vlm_decode_jax_vs_torch: …x` (tokens/s ratios, > 1 = JAX faster).
Usage: python bench/vlm.py [--batch 4] [--prompt 256] [--new 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from recogdrive_jax.convert import internvl as cv  # noqa: E402
from recogdrive_jax.models import internvl as iv  # noqa: E402
from bench.common import small_internvl_config as bench_config, time_call  # noqa: E402






def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    from transformers import InternVLConfig as HFConfig
    from transformers import InternVLForConditionalGeneration

    cfg = bench_config()
    d = iv.config_to_hf(cfg, "native")
    hc = HFConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    hc._attn_implementation = "sdpa"
    torch.manual_seed(0)
    tm = InternVLForConditionalGeneration(hc).eval()
    jm = cv.load_hf_model({k: v.detach().numpy() for k, v in tm.state_dict().items()}, cfg, layout="native")

    b, t, n_new, k = a.batch, a.prompt, a.new, cfg.num_image_token
    rng = np.random.default_rng(0)
    ids = rng.integers(20, cfg.llm_config.vocab_size, (b, t))
    ids[:, 1] = cfg.img_start_token_id
    ids[:, 2:2 + k] = cfg.image_token_id
    ids[:, 2 + k] = cfg.img_end_token_id
    mask = np.ones_like(ids)
    pv = rng.standard_normal((b, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)).astype(np.float32)
    t_ids, t_mask, t_pv = torch.tensor(ids), torch.tensor(mask), torch.tensor(pv)
    j_ids, j_mask, j_pv = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pv.transpose(0, 2, 3, 1))

    # ---- prefill
    from flax import nnx
    graphdef, state = nnx.split(jm)

    @jax.jit
    def j_prefill(state, ids, mask, pv):
        cache = iv.init_cache(cfg, b, t + n_new)
        return iv.prefill(nnx.merge(graphdef, state), cache, ids, mask, pv, None)

    tj_prefill = time_call(lambda: jax.block_until_ready(j_prefill(state, j_ids, j_mask, j_pv)), a.repeats, "min")

    def torch_prefill():
        with torch.no_grad():
            return tm(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pv, use_cache=True, logits_to_keep=1)

    tt_prefill = time_call(torch_prefill, a.repeats, "min")

    # ---- decode: JAX = full jitted generate minus prefill; torch = cached forward loop
    def j_gen():
        return jax.block_until_ready(iv.generate(jm, j_ids, j_mask, j_pv, None, max_new_tokens=n_new,
                                                 eos_token_id=-1))

    tj_decode = max(time_call(j_gen, a.repeats, "min") - tj_prefill, 1e-9)

    def torch_decode():
        with torch.no_grad():
            out = torch_prefill()
            cache = out.cache
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            m = t_mask
            t0 = time.perf_counter()
            for _ in range(n_new):
                m = torch.cat([m, torch.ones_like(tok)], dim=1)
                out = tm(input_ids=tok, attention_mask=m, cache=cache, use_cache=True)
                cache = out.cache
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - t0

    torch_decode()
    tt_decode = min(torch_decode() for _ in range(a.repeats))

    pre_tok = b * t
    dec_tok = b * n_new
    print(f"config: vit {cfg.vision_config.hidden_size}x{cfg.vision_config.num_hidden_layers}, llm "
          f"{cfg.llm_config.hidden_size}x{cfg.llm_config.num_hidden_layers}, batch {b}, prompt {t}, new {n_new}, "
          f"jax {jax.default_backend()}, torch threads {torch.get_num_threads()}")
    print(f"prefill tokens/s: jax {pre_tok / tj_prefill:,.0f}  torch {pre_tok / tt_prefill:,.0f}")
    print(f"decode tokens/s:  jax {dec_tok / tj_decode:,.0f}  torch {dec_tok / tt_decode:,.0f}")
    print(f"vlm_prefill_jax_vs_torch: {tt_prefill / tj_prefill:.2f}x")
    print(f"vlm_decode_jax_vs_torch: {tt_decode / tj_decode:.2f}x")


if __name__ == "__main__":
    main()
