"""SFT training throughput of this stack vs transformers + PyTorch, and hidden-cache bytes vs upstream's layout.

1. SFT tokens/s: one full training step (ViT + mlp1 + LLM forward, assistant-token CE, backward, clip, AdamW) on
   the same small InternVL config, the same weights and the same batch, in this process. JAX runs the `sft` stage's
   own loss (`stages/lm_loss.make_loss_fn`: chunked CE, segment mask) through the loop's jitted train step
   (`train/state.make_train_step`, `train/optim.make_optimizer`) with donated state; PyTorch runs
   `InternVLForConditionalGeneration(..., labels=...)` + `clip_grad_norm_` + `torch.optim.AdamW`. Both fp32 by
   default (`--dtype bfloat16`: JAX bf16 compute, torch CPU/GPU autocast bf16). Prints
   `sft_tokens_per_s_jax_vs_torch: 1.9x` (> 1 = JAX faster).
2. Cache bytes per sample: a compact `HiddenCache` (bf16, only real tokens, zstd) of a ReCogDrive-2B-shaped sample
   (hidden 1536, 9 tiles x 256 image tokens + the driving prompt's text) vs upstream's 2800 x hidden x 4 bytes.
   Prints `cache_bytes_upstream_vs_compact: 2.3x`.

Usage: python bench/sft.py [--batch 4] [--seq 512] [--steps 5] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from recogdrive_jax.convert import internvl as cv  # noqa: E402
from recogdrive_jax.models import internvl as iv  # noqa: E402
from bench.common import small_internvl_config as bench_config  # noqa: E402
from recogdrive_jax.train import optim  # noqa: E402
from recogdrive_jax.train.state import init_train_state, make_train_step  # noqa: E402
from recogdrive_jax.vlm import checkpoint as vlm_ckpt  # noqa: E402
from recogdrive_jax.vlm import lm_loss  # noqa: E402




def make_batch(cfg, b: int, t: int, tiles: int, seed: int = 0) -> dict:
    """Right-padded rows (lengths 75-100% of t), `tiles` real tiles each; labels on the last 40% of each row."""
    rng = np.random.default_rng(seed)
    k = cfg.num_image_token * tiles
    ids = rng.integers(20, cfg.llm_config.vocab_size, (b, t)).astype(np.int32)
    lens = rng.integers(int(0.75 * t), t + 1, b)
    lens[0] = t
    mask = (np.arange(t)[None] < lens[:, None]).astype(np.int32)
    ids[:, 1] = cfg.img_start_token_id
    ids[:, 2:2 + k] = cfg.image_token_id
    ids[:, 2 + k] = cfg.img_end_token_id
    ids = np.where(mask > 0, ids, cfg.pad_token_id)
    labels = np.full((b, t), -100, np.int32)
    for r, n in enumerate(lens):
        s = int(0.6 * n)
        labels[r, s:n] = ids[r, s:n]
    s = cfg.vision_config.image_size
    pv = rng.standard_normal((b, tiles, s, s, 3)).astype(np.float32)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "segment_ids": mask.copy(),
            "positions": np.where(mask > 0, np.arange(t)[None], 0).astype(np.int32), "pixel_values": pv,
            "image_flags": np.ones((b, tiles), np.int32)}


def optim_cfg():
    return ml_collections.ConfigDict(dict(lr=4e-5, warmup_ratio=0.1, warmup_steps=0, schedule="cosine",
                                          min_lr_ratio=0.0, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
                                          clip_norm=1.0, freeze=()))


def bench_sft(a) -> float:
    from transformers import InternVLConfig as HFConfig
    from transformers import InternVLForConditionalGeneration

    cfg = bench_config()
    d = iv.config_to_hf(cfg, "native")
    hc = HFConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    hc._attn_implementation = "sdpa"
    torch.manual_seed(0)
    tm = InternVLForConditionalGeneration(hc).train()
    params = cv.hf_to_params(cv.TensorSource({k: v.detach().numpy() for k, v in tm.state_dict().items()},
                                             "native"), cfg)
    batch = make_batch(cfg, a.batch, a.seq, a.tiles)
    tokens = int(batch["attention_mask"].sum())

    # ---- JAX: the stage's loss through the loop's train step
    mdef = vlm_ckpt.module_def(cfg, a.dtype)
    tx = optim.make_optimizer(optim_cfg(), 1000, params)
    step = jax.jit(make_train_step(lm_loss.make_loss_fn(mdef, chunk=512, drop_path=False, grad_accum=1), tx,
                                   schedule=optim.make_schedule(optim_cfg(), 1000)), donate_argnums=(0,))
    state = init_train_state(jax.tree.map(jnp.asarray, params), tx)
    jb = jax.tree.map(jnp.asarray, batch)
    rng = jax.random.key(0)
    state, m = step(state, jb, rng)  # compile
    jax.block_until_ready(m)
    first_loss_jax = float(m["loss"])
    t0 = time.perf_counter()
    for i in range(a.steps):
        state, m = step(state, jb, jax.random.fold_in(rng, i))
    jax.block_until_ready(m)
    tj = (time.perf_counter() - t0) / a.steps

    # ---- PyTorch
    opt = torch.optim.AdamW(tm.parameters(), lr=4e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    b, nt = batch["image_flags"].shape
    s = cfg.vision_config.image_size
    t_ids, t_mask = torch.tensor(batch["input_ids"]).long(), torch.tensor(batch["attention_mask"]).long()
    t_labels = torch.tensor(batch["labels"]).long()
    t_pv = torch.tensor(batch["pixel_values"].reshape(b * nt, s, s, 3).transpose(0, 3, 1, 2).copy())
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "bfloat16")

    def torch_step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = tm(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pv, labels=t_labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    first_loss_torch = torch_step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(a.steps):
        torch_step()
    tt = (time.perf_counter() - t0) / a.steps
    print(f"config: vit {cfg.vision_config.hidden_size}x{cfg.vision_config.num_hidden_layers} @"
          f"{cfg.vision_config.image_size}px, llm {cfg.llm_config.hidden_size}x{cfg.llm_config.num_hidden_layers} "
          f"vocab {cfg.llm_config.vocab_size}; batch {a.batch} x {a.seq} tokens ({tokens} real, {a.tiles} tiles a "
          f"row), {a.dtype}; jax {jax.default_backend()} ({jax.device_count()} device(s)), torch "
          f"{torch.get_num_threads()} threads")
    print(f"first-step loss: jax {first_loss_jax:.5f}  torch {first_loss_torch:.5f} (same weights and batch)")
    print(f"sft step: jax {tj * 1e3:.1f} ms  torch {tt * 1e3:.1f} ms")
    print(f"sft tokens/s: jax {tokens / tj:,.0f}  torch {tokens / tt:,.0f}")
    print(f"sft_tokens_per_s_jax_vs_torch: {tt / tj:.2f}x")
    return tt / tj


def bench_cache_bytes(hidden: int = 1536, tiles: int = 9, text_tokens: int = 330, n: int = 4) -> float:
    """Compact cache bytes per sample (random-normal states: the worst case for compression)."""
    from recogdrive_jax.data.hidden_cache import HiddenCache
    length = tiles * 256 + text_tokens
    upstream = 2800 * hidden * 4
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        cache = HiddenCache.create(os.path.join(d, "c"), n, length, hidden, layout="compact")
        h = rng.standard_normal((n, length, hidden)).astype(np.float32)
        cache.write(np.arange(n), h, np.ones((n, length), bool))
        total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(d, "c", "hidden"))
                    for f in fs)
    per = total / n
    print(f"cache bytes/sample: upstream 2800 x {hidden} x 4 = {upstream / 1e6:.2f} MB, compact bf16 "
          f"{length} real tokens = {per / 1e6:.2f} MB")
    print(f"cache_bytes_upstream_vs_compact: {upstream / per:.2f}x")
    return upstream / per


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--tiles", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--skip-sft", action="store_true")
    a = ap.parse_args(argv)
    if not a.skip_sft:
        bench_sft(a)
    bench_cache_bytes()


if __name__ == "__main__":
    main()
