"""Prefill, decode and generate throughput of the Flax InternVL port vs transformers (PyTorch), interleaved.

    python bench/vlm.py                  # anchor: InternVL3-1B widths, 2+2 layers, 2 prompts x 532 tokens, tiles 2,1
    python bench/vlm.py --quick          # tiny config smoke path (what tests/test_bench_vlm.py runs)
    python bench/vlm.py --profile DIR    # per-op tables of the decode loop, both sides (--profile-side jax|torch)

Both sides run in this process on the same weights (converted from the torch model, fp32) and the same prompts
(every token real; row r carries tiles[r] image tiles, 256 `<IMG_CONTEXT>` tokens each at the anchor):
* prefill: ViT + mlp1 + LLM over the prompt, filling the KV cache, logits of the last token (JAX: jitted
  `internvl.prefill` into a fixed-size cache; torch: `model(..., use_cache=True, logits_to_keep=1)`);
* decode: `--new` greedy steps from a prefilled cache (JAX: one jitted `fori_loop` of `internvl.decode_step` on the
  per-layer weights sliced once before the loop, as `internvl.generate` runs it;
  torch: the cached forward loop that `generate` runs, its DynamicCache cropped back after each repeat);
* generate: prompt → `--new` greedy tokens (JAX: `internvl.generate`; torch: `model.generate(do_sample=False)`).
Baseline attention: transformers' default `sdpa`. Method: bench/common.py (ABAB repeats, ≥ 5, min/median, compile
apart, single-threaded both sides by default, the quiet gate on the RESULTS row). tokens/s counts real tokens;
prints `vlm_prefill_jax_vs_torch: 1.23x`, `vlm_decode_jax_vs_torch`, `vlm_generate_jax_vs_torch` (> 1 = JAX
faster; min over repeats).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402


def _parse(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=532)
    ap.add_argument("--tiles", default="2,1", help="image tiles of each prompt (comma list, or one count for all)")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--vit-layers", type=int, default=2)
    ap.add_argument("--llm-layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="interleaved repeats per side (>= 5)")
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="1 = single-threaded XLA and torch (recordable); 0 = "
                                                           "defaults")
    ap.add_argument("--quick", action="store_true", help="tiny config, 2 x 32 tokens: a smoke run, not a figure")
    ap.add_argument("--profile", metavar="DIR", help="instead of timing: per-op profile of the decode loop (XLA "
                                                     "per-thunk self time, torch.profiler per aten op), tables printed")
    ap.add_argument("--profile-side", choices=("both", "jax", "torch"), default="both")
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.prompt, a.new = 2, 32, 4
    return a


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads == 1:
    common.single_thread()  # before jax and torch initialise
if ARGS is not None and ARGS.profile:  # one trace event per XLA CPU thunk (fusion, dot, ...)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from recogdrive_jax.convert import internvl as cv  # noqa: E402
from recogdrive_jax.models import internvl as iv  # noqa: E402
from recogdrive_jax.models.layers import first_argmax  # noqa: E402


def make_prompts(cfg, b: int, t: int, tiles: list[int], seed: int = 0):
    """ids [B, T] (all real), pixel_values [sum(tiles), S, S, 3] NHWC: row r's tiles' tokens after its <img>."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(20, cfg.llm_config.vocab_size, (b, t))
    for r, n in enumerate(tiles):
        k = cfg.num_image_token * n
        if k + 4 > t:
            raise ValueError(f"prompt {t} is too short for {n} tiles of {cfg.num_image_token} tokens")
        ids[r, 1] = cfg.img_start_token_id
        ids[r, 2:2 + k] = cfg.image_token_id
        ids[r, 2 + k] = cfg.img_end_token_id
    s = cfg.vision_config.image_size
    return ids, np.ones_like(ids), rng.standard_normal((sum(tiles), s, s, 3)).astype(np.float32)


def main(a) -> int:
    import torch
    from bench.sft import row_tiles  # noqa: PLC0415  (one tiles parser)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    cfg = iv.get_config("tiny") if a.quick else common.anchor_internvl_config(a.vit_layers, a.llm_layers)
    tm = common.hf_internvl(cfg, train=False)
    jm = cv.load_hf_model({k: v.detach().numpy() for k, v in tm.state_dict().items()}, cfg, layout="native")
    b, t, n_new = a.batch, a.prompt, a.new
    tiles = row_tiles(a.tiles, b)
    ids, mask, pv = make_prompts(cfg, b, t, tiles)
    t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
    t_pv = torch.tensor(pv.transpose(0, 3, 1, 2).copy())
    j_ids, j_mask, j_pv = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pv)
    print(f"# vlm bench: vit {cfg.vision_config.hidden_size}x{cfg.vision_config.num_hidden_layers}, llm "
          f"{cfg.llm_config.hidden_size}x{cfg.llm_config.num_hidden_layers} vocab {cfg.llm_config.vocab_size}; "
          f"{b} prompts x {t} tokens (all real), tiles {tiles}, {n_new} new tokens, fp32; jax "
          f"{jax.default_backend()}, torch threads {torch.get_num_threads()}, {common.load_average()}")
    graphdef, state = nnx.split(jm)

    # ---- prefill
    @jax.jit
    def j_prefill(state, ids, mask, pv):
        cache = iv.init_cache(cfg, b, t + n_new)
        return iv.prefill(nnx.merge(graphdef, state), cache, ids, mask, pv, None)

    def torch_prefill():
        with torch.no_grad():
            return tm(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pv, use_cache=True, logits_to_keep=1)

    t0 = time.perf_counter()
    cache0, logits0 = jax.block_until_ready(j_prefill(state, j_ids, j_mask, j_pv))
    compile_s = time.perf_counter() - t0
    ref = torch_prefill()
    diff = float(np.max(np.abs(np.asarray(logits0) - ref.logits[:, -1].numpy())))
    print(f"# prefill last-token logits: max |jax - torch| {diff:.2e}")
    timings = [common.interleaved("vlm_prefill_jax_vs_torch", torch_prefill,
                                  lambda: jax.block_until_ready(j_prefill(state, j_ids, j_mask, j_pv)),
                                  reps=a.reps)]
    timings[0].compile_s = compile_s  # the first call above; interleaved's own first call was a steady-state one

    # ---- decode from a prefilled cache
    @jax.jit
    def j_decode(state, cache, logits):
        model = nnx.merge(graphdef, state)
        layer_states = model.language_model.model.layer_states()  # as internvl.generate: sliced once

        def body(_, c):
            cache, logits, out = c
            tok = first_argmax(logits)  # = argmax, as internvl.generate picks it
            cache, logits = iv.decode_step(model, cache, tok, layer_states)
            return cache, logits, out + tok  # keeps the tokens live

        return jax.lax.fori_loop(0, n_new, body, (cache, logits, jnp.zeros((b,), jnp.int32)))[2]

    t_cache = ref.cache

    def torch_decode():
        with torch.no_grad():
            tok = ref.logits[:, -1].argmax(-1, keepdim=True)
            m = t_mask
            for _ in range(n_new):
                m = torch.cat([m, torch.ones_like(tok)], dim=1)
                out = tm(input_ids=tok, attention_mask=m, cache=t_cache, use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            t_cache.crop(-n_new)  # back to the prompt for the next repeat
        return tok

    if a.profile:
        profile_decode(a, j_decode, (state, cache0, logits0), torch_decode)
        return 0
    timings.append(common.interleaved("vlm_decode_jax_vs_torch", torch_decode,
                                      lambda: jax.block_until_ready(j_decode(state, cache0, logits0)), reps=a.reps))

    # ---- generate (prefill + decode), greedy, no early stop
    if not a.no_generate:
        def torch_generate():
            with torch.no_grad():
                return tm.generate(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pv, do_sample=False,
                                   max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=cfg.pad_token_id)

        def jax_generate():
            return jax.block_until_ready(iv.generate(jm, j_ids, j_mask, j_pv, None, max_new_tokens=n_new,
                                                     eos_token_id=-1))

        timings.append(common.interleaved("vlm_generate_jax_vs_torch", torch_generate, jax_generate, reps=a.reps))

    for tm_ in timings:
        tm_.print()
    pre, dec = timings[0], timings[1]
    print(f"# prefill tokens/s (min time): jax {b * t / min(pre.jax_s):,.0f}  torch {b * t / min(pre.baseline_s):,.0f}")
    print(f"# decode tokens/s (min time):  jax {b * n_new / min(dec.jax_s):,.0f}  torch "
          f"{b * n_new / min(dec.baseline_s):,.0f}")
    if not a.quick:
        common.print_results_row(timings, "python bench/vlm.py")
    return 0


def profile_decode(a, j_decode, args, torch_decode, top: int = 20) -> None:
    """Per-op self time of the `--new`-token decode loop on each side, per token (shares within one process:
    meaningful on a loaded machine), then each side's loop in process CPU time (min of 3)."""
    from bench import sft as bs  # noqa: PLC0415  (the shared trace/table helpers)
    n = a.new
    if a.profile_side != "jax":
        import torch
        from torch.profiler import ProfilerActivity, profile
        torch_decode()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            torch_decode()
        rows = sorted(((e.key, e.self_cpu_time_total * 1e-6 / n, e.count / n, f"{e.key} {e.input_shapes}")
                       for e in prof.key_averages(group_by_input_shape=True)), key=lambda r: -r[1])
        total = sum(r[1] for r in rows)
        bs._table(rows, total, top, "torch decode, aten ops (self time) a token")
        bs._categories(rows, total, "torch")
        del torch
    if a.profile_side != "torch":
        compiled = j_decode.lower(*args).compile()
        hlo = compiled.as_text()
        with open(os.path.join(a.profile, "vlm_decode.hlo.txt"), "w") as f:
            f.write(hlo)
        jax_decode = lambda: jax.block_until_ready(compiled(*args))  # noqa: E731
        jax_decode()
        rows = [(k, s / n, c / n, kind) for k, s, c, kind in bs.thunk_rows(a.profile, bs._hlo_kinds(hlo), jax_decode,
                                                                            1)]
        total = sum(r[1] for r in rows)
        bs._table(rows, total, top, "jax decode, XLA thunks (self time) a token")
        bs._categories(rows, total, "jax")
    for name, fn in (("torch", torch_decode), ("jax", lambda: jax.block_until_ready(j_decode(*args)))):
        if a.profile_side in ("both", name):
            cpu = []
            for _ in range(3):
                c0 = time.process_time()
                fn()
                cpu.append(time.process_time() - c0)
            print(f"# {name} decode loop: {min(cpu) * 1e3 / n:.1f} ms CPU a token (min of 3, {n} tokens, no tracing)")


if __name__ == "__main__":
    raise SystemExit(main(ARGS))
