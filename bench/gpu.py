"""The one prepared GPU script (issue 17): ≤ 8 minutes, run whenever a device is lent, figures into RESULTS.md.

    python bench/gpu.py                # on the GPU: 2B-shaped SFT step MFU, DDIM-5 batch-1 latency, planner step
    python bench/gpu.py --smoke        # tiny shapes on CPU (what tests/test_gpu_bench.py runs)

1. SFT step, InternVL3-2B shape (InternViT-300M + Qwen2.5-1.5B widths), bf16 compute with fp32 master params and
   fp32 AdamW state (the mixed-precision policy), per-layer remat, the `sft` stage's own chunked-CE loss through the
   loop's train step. MFU = model FLOPs / (step time × peak bf16 FLOP/s of the device), model FLOPs counted
   analytically (6·N·tokens for the matmul parameters of both towers and the projector + causal/full attention
   scores), not from XLA's cost analysis (which counts remat recomputation: that figure is printed as HFU).
2. DDIM-5 `get_action` latency at batch 1: DiT small, Hv 1536 (2B), 2,800 VLM tokens (upstream's input length).
3. Planner IL train step, DiT small, batch 16, vl_len 2800: steps/s.
Every timing: warm-up (compile printed separately) then the median of repeats, `block_until_ready` on outputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from bench import common  # noqa: E402
from recogdrive_jax.models import internvl as iv  # noqa: E402
from recogdrive_jax.models.planner import build_planner, planner_config  # noqa: E402
from recogdrive_jax.train import optim  # noqa: E402
from recogdrive_jax.train.state import init_train_state, make_train_step  # noqa: E402
from recogdrive_jax.vlm import checkpoint as vlm_ckpt, lm_loss  # noqa: E402

# Dense bf16 peak FLOP/s by `device_kind` prefix (vendor datasheets, no sparsity).
PEAK_BF16 = {"NVIDIA H200": 989.4e12, "NVIDIA H100": 989.4e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12}


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for prefix, v in PEAK_BF16.items():
        if kind.startswith(prefix):
            return v
    return None


def median_time(fn, reps: int) -> tuple[float, float]:
    """(compile/first-call seconds, median seconds of `reps` further calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return first, float(np.median(ts))


def matmul_params(cfg: iv.InternVLConfig) -> dict[str, int]:
    """Weights that multiply every token (per tower): attention and MLP projections, the projector, the LM head."""
    v, l = cfg.vision_config, cfg.llm_config
    kv = l.num_key_value_heads * (l.hidden_size // l.num_attention_heads)
    return {"vit": v.num_hidden_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size),
            "projector": cfg.projector_in * l.hidden_size + l.hidden_size ** 2,
            "llm": l.num_hidden_layers * (2 * l.hidden_size ** 2 + 2 * l.hidden_size * kv +
                                          3 * l.hidden_size * l.intermediate_size) + l.hidden_size * l.vocab_size}


def sft_model_flops(cfg: iv.InternVLConfig, rows: int, seq: int, tiles: int) -> float:
    """Training FLOPs of one step (forward + backward = 3 × forward), counting matmuls only."""
    v, l = cfg.vision_config, cfg.llm_config
    n = matmul_params(cfg)
    patches = (v.image_size // v.patch_size) ** 2 + 1  # + class token
    vit = 2 * n["vit"] * patches + v.num_hidden_layers * 4 * patches ** 2 * v.hidden_size  # projections + QK/PV
    proj = 2 * n["projector"] * cfg.num_image_token
    llm = 2 * n["llm"] * seq + l.num_hidden_layers * 2 * seq ** 2 * l.hidden_size  # causal: half of 4·T²·D
    return 3.0 * rows * (tiles * (vit + proj) + llm)


def sft_mfu(a) -> None:
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_sft", os.path.join(ROOT, "bench", "sft.py"))
    bsft = importlib.util.module_from_spec(spec)
    # bench/sft.py's batch maker and optimizer settings (one definition of the SFT batch), loaded only here, after
    # jax chose its backend: that module sets JAX_PLATFORMS=cpu on import, which at the top would hide the GPU.
    spec.loader.exec_module(bsft)
    cfg = dataclasses.replace(iv.get_config("tiny" if a.smoke else "internvl3_2b"), remat=not a.smoke)
    rows, seq, tiles = (2, 64, 2) if a.smoke else (a.rows, a.seq, a.tiles)
    mdef = vlm_ckpt.module_def(cfg, "bfloat16")
    oc = bsft.optim_cfg()
    params = jax.jit(mdef.init)(jax.random.key(0))
    tx = optim.make_optimizer(oc, 1000, params)
    step = jax.jit(make_train_step(lm_loss.make_loss_fn(mdef, chunk=min(seq, 1024), drop_path=False,
                                                        grad_accum=1), tx,
                                   schedule=optim.make_schedule(oc, 1000)), donate_argnums=(0,))
    state = init_train_state(params, tx)
    batch = jax.tree.map(jnp.asarray, bsft.make_batch(cfg, rows, seq, tiles))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    hfu_flops = (cost[0] if isinstance(cost, list) else cost or {}).get("flops")
    box = {"state": state}

    def one():
        box["state"], m = compiled(box["state"], batch, jax.random.key(1))
        return m["loss"]

    _, t = median_time(one, a.reps)
    flops = sft_model_flops(cfg, rows, seq, tiles)
    peak = peak_flops(jax.devices()[0])
    tokens = int(np.sum(batch["attention_mask"]))
    print(f"# sft {('tiny' if a.smoke else 'internvl3_2b')}: {rows} rows x {seq} tokens, {tiles} tiles a row, bf16 "
          f"compute / fp32 master+Adam, remat {cfg.remat}: step {t * 1e3:.1f} ms (compile {compile_s:.1f} s), "
          f"{tokens / t:,.0f} tokens/s, model {flops / t / 1e12:.2f} TFLOP/s"
          + (f", XLA-counted {hfu_flops / t / 1e12:.2f} TFLOP/s" if hfu_flops else ""))
    if peak:
        print(f"sft_2b_mfu: {100 * flops / t / peak:.1f}%")
        if hfu_flops:
            print(f"sft_2b_hfu: {100 * hfu_flops / t / peak:.1f}%")
    else:
        print(f"# sft MFU: no peak known for device kind {getattr(jax.devices()[0], 'device_kind', '?')!r}")


def planner(a) -> None:
    cfg = planner_config("tiny4" if a.smoke else "small", vlm_size="small")
    vl_len, b_train = (16, 4) if a.smoke else (2800, 16)
    m = build_planner(cfg, nnx.Rngs(0))
    g = np.random.default_rng(0)

    def cond(b):
        return {"vl_states": jnp.asarray(g.normal(size=(b, vl_len, cfg.vl_dim)), jnp.float32),
                "status": jnp.asarray(g.normal(size=(b, 8)), jnp.float32),
                "history": jnp.asarray(g.normal(size=(b, 4, 3)), jnp.float32)}

    sample = nnx.jit(lambda m, c, r: m.sample(c, r, deterministic=False))
    c1 = cond(1)
    compile_s, t = median_time(lambda: sample(m, c1, jax.random.key(2)), a.reps * 4)
    print(f"# ddim5 batch 1, vl_len {vl_len}, Hv {cfg.vl_dim}: {t * 1e3:.2f} ms (compile {compile_s:.1f} s)")
    print(f"planner_ddim5_b1_ms: {t * 1e3:.2f}")

    opt = nnx.Optimizer(m, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4)), wrt=nnx.Param)
    batch = {"cond": cond(b_train), "future": jnp.asarray(g.normal(size=(b_train, 8, 3)) * [10, 2, 0.2], jnp.float32)}

    @nnx.jit
    def train_step(m, opt, batch, rng):
        loss, grads = nnx.value_and_grad(lambda m: m.loss(batch, rng)[0])(m)
        opt.update(m, grads)
        return loss

    compile_s, t = median_time(lambda: train_step(m, opt, batch, jax.random.key(3)), a.reps)
    print(f"# planner train step, batch {b_train}, vl_len {vl_len}: {1 / t:.2f} steps/s (compile {compile_s:.1f} s)")
    print(f"planner_train_steps_per_s: {1 / t:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU test of the script itself)")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--tiles", type=int, default=12)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-sft", action="store_true")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    d = jax.devices()[0]
    print(f"# bench/gpu.py: {d.platform} {getattr(d, 'device_kind', '')} x{jax.device_count()}, jax "
          f"{jax.__version__}, {common.load_average()}")
    if not a.skip_sft:
        sft_mfu(a)
    planner(a)
    print(f"# total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
