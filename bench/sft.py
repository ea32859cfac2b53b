"""SFT step throughput of this stack vs transformers + PyTorch (interleaved, one process), and hidden-cache bytes.

    python bench/sft.py                  # anchor: InternVL3-1B widths, 2+2 layers, 2 rows x 532 tokens, tiles 2,1
    python bench/sft.py --quick          # tiny config smoke path (what tests/test_bench_vlm.py runs)

1. SFT tokens/s: one full training step (ViT + mlp1 + LLM forward, assistant-token CE, backward, clip, AdamW) on
   the same config, the same weights and the same batch. JAX runs the `sft` stage's own loss
   (`vlm/lm_loss.make_loss_fn`: chunked CE at the stage's default `model.loss_chunk`, segment mask) through the
   loop's jitted train step (`train/state.make_train_step`, `train/optim.make_optimizer`) with donated state;
   PyTorch runs `InternVLForConditionalGeneration(..., labels=...)` (default `sdpa` attention, full-vocab fp32 CE as
   transformers computes it) + `clip_grad_norm_` + `torch.optim.AdamW`. Same padded token count, loss mask (labels
   on the last 40 % of each row), remat off on both sides; the JAX batch has the `sft` collator's tile layout
   (data/length_grouping.py: the batch's real tiles packed flat into one tile group on one device, padded to a
   bucket of the total: 3 tiles for the anchor's rows of 2 and 1), torch gets the real tiles. fp32 by default
   (`--dtype bfloat16`: JAX bf16 compute, torch CPU autocast bf16). Method: bench/common.py (ABAB repeats, ≥ 5,
   min/median, compile apart, single-threaded both sides by default, the quiet gate on the RESULTS row).
   Prints `sft_tokens_per_s_jax_vs_torch: 1.23x` (real tokens/s ratio, > 1 = JAX faster; min over repeats).
2. Cache bytes per sample: a compact `HiddenCache` (bf16, only real tokens, zstd) of a ReCogDrive-2B-shaped sample
   (hidden 1536, 9 tiles x 256 image tokens + the driving prompt's text) vs upstream's 2800 x hidden x 4 bytes.
   Prints `cache_bytes_upstream_vs_compact: 2.3x`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402


def _parse(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=532)
    ap.add_argument("--tiles", default="2,1", help="real tiles of each row (comma list, or one count for all rows)")
    ap.add_argument("--vit-layers", type=int, default=2)
    ap.add_argument("--llm-layers", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=2048, help="CE chunk (the sft stage's default model.loss_chunk)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repeats per side (>= 5)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--threads", type=int, default=1, help="1 = single-threaded XLA and torch (recordable); 0 = "
                                                           "defaults")
    ap.add_argument("--quick", action="store_true", help="tiny config, 2 x 64 tokens: a smoke run, not a figure")
    ap.add_argument("--skip-sft", action="store_true")
    ap.add_argument("--skip-cache", action="store_true")
    ap.add_argument("--profile", metavar="DIR", help="instead of timing: per-op profile of both steps (jax.profiler "
                                                     "trace with per-thunk events, torch.profiler), tables printed")
    ap.add_argument("--profile-steps", type=int, default=1)
    ap.add_argument("--profile-side", choices=("both", "jax", "torch"), default="both",
                    help="profile one side only (halves the memory: two anchor-sized models and optimizer states "
                         "need ~15 GB)")
    ap.add_argument("--ops", action="store_true", help="instead of the step: the step's heavy ops alone at anchor "
                                                       "shapes (LM head products, CE, ViT/LLM MLP, ViT attention)")
    ap.add_argument("--ops-rows", type=int, default=256, help="rows of the vocab-sized ops in --ops")
    ap.add_argument("--ops-only", default="", help="comma list of --ops case names (e.g. lm_head_grad_x,"
                                                   "lm_head_grad_x_wt_copy); '' = all")
    ap.add_argument("--ab-layout", action="store_true", help="instead of the torch comparison: the JAX step on "
                    "the collator's flat tile layout (B) vs the per-row padded layout it replaced (A; each row's "
                    "tiles padded to the longest row), interleaved, wall and process CPU time, loss and parameters "
                    "after one step compared (no torch model: half the memory)")
    ap.add_argument("--ab", metavar="OPT=VAL[,OPT=VAL]", help="instead of the torch comparison: the JAX step "
                    "compiled with these XLA options vs without, interleaved, and whether both give bitwise the same "
                    "loss and parameters after one step (e.g. "
                    "xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_DOT)")
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.seq, a.skip_cache = 2, 64, True
    return a


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads == 1:
    common.single_thread()  # before jax and torch initialise
if ARGS is not None and ARGS.profile:  # one trace event per XLA CPU thunk (fusion, dot, ...)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from recogdrive_jax.convert import internvl as cv  # noqa: E402
from recogdrive_jax.data import length_grouping as lg  # noqa: E402
from recogdrive_jax.models import internvl as iv  # noqa: E402
from recogdrive_jax.train import optim  # noqa: E402
from recogdrive_jax.train.state import init_train_state, make_train_step  # noqa: E402
from recogdrive_jax.vlm import checkpoint as vlm_ckpt  # noqa: E402
from recogdrive_jax.vlm import lm_loss  # noqa: E402
from recogdrive_jax.vlm import qa_batches  # noqa: E402


def row_tiles(tiles: int | str | Sequence[int], b: int) -> list[int]:
    """'2,1' / [2, 1] / 2 → real tiles of each of the b rows."""
    if isinstance(tiles, str):
        tiles = [int(x) for x in tiles.split(",") if x]
    if isinstance(tiles, int):
        return [tiles] * b
    tiles = list(tiles)
    if len(tiles) == 1:
        return tiles * b
    if len(tiles) != b or min(tiles) < 1:
        raise ValueError(f"tiles {tiles}: expected one count >= 1 per row of a batch of {b}")
    return tiles


def make_batch(cfg, b: int, t: int, tiles, seed: int = 0, layout: str = "flat") -> dict:
    """Right-padded rows (lengths 75-100% of t, row 0 full), row r with tiles[r] real tiles; labels on the last 40%
    of each row. layout 'flat': the sft collator's tiles on one device (`length_grouping.flat_tiles`, one tile group,
    its default buckets); 'rows': each row's tiles padded to the longest row (flag 0), the layout before it."""
    rng = np.random.default_rng(seed)
    per_row = row_tiles(tiles, b)
    m = max(per_row)
    ids = rng.integers(20, cfg.llm_config.vocab_size, (b, t)).astype(np.int32)
    lens = rng.integers(int(0.75 * t), t + 1, b)
    lens[0] = t
    ks = [cfg.num_image_token * n for n in per_row]
    if max(ks) + 4 > t:
        raise ValueError(f"seq {t} is too short for {max(per_row)} tiles of {cfg.num_image_token} tokens")
    lens = np.maximum(lens, np.asarray(ks) + 4)  # every image token inside the row
    mask = (np.arange(t)[None] < lens[:, None]).astype(np.int32)
    for r, k in enumerate(ks):
        ids[r, 1] = cfg.img_start_token_id
        ids[r, 2:2 + k] = cfg.image_token_id
        ids[r, 2 + k] = cfg.img_end_token_id
    ids = np.where(mask > 0, ids, cfg.pad_token_id)
    labels = np.full((b, t), -100, np.int32)
    for r, n in enumerate(lens):
        s = int(0.6 * n)
        labels[r, s:n] = ids[r, s:n]
    s = cfg.vision_config.image_size
    pv = rng.standard_normal((b, m, s, s, 3)).astype(np.float32)
    flags = (np.arange(m)[None] < np.asarray(per_row)[:, None]).astype(np.int32)
    pv = pv * flags[:, :, None, None, None]
    if layout == "flat":  # as GroupedBatches.collate on one device without accumulation
        buckets = lg.default_group_tile_buckets(b * max(qa_batches.default_tile_buckets(cfg)))
        pv, flags = lg.flat_tiles([pv[r, :n] for r, n in enumerate(per_row)], lg.tile_group_of_rows(b), buckets, s)
    elif layout != "rows":
        raise ValueError(f"layout {layout!r}: expected 'flat' or 'rows'")
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "segment_ids": mask.copy(),
            "positions": np.where(mask > 0, np.arange(t)[None], 0).astype(np.int32), "pixel_values": pv,
            "image_flags": flags}


def optim_cfg():
    return ml_collections.ConfigDict(dict(lr=4e-5, warmup_ratio=0.1, warmup_steps=0, schedule="cosine",
                                          min_lr_ratio=0.0, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
                                          clip_norm=1.0, freeze=()))


def bench_config(a):
    if a.quick:
        return iv.get_config("tiny")
    return common.anchor_internvl_config(vit_layers=a.vit_layers, llm_layers=a.llm_layers)


def setup(a):
    """(cfg, torch model, jax step fn, torch step fn, batch): both sides ready, same weights and batch."""
    import torch
    cfg = bench_config(a)
    tm = common.hf_internvl(cfg, train=True)
    params = cv.hf_to_params(cv.TensorSource({k: v.detach().numpy() for k, v in tm.state_dict().items()},
                                             "native"), cfg)
    batch = make_batch(cfg, a.batch, a.seq, a.tiles)

    # ---- JAX: the stage's loss through the loop's train step
    mdef = vlm_ckpt.module_def(cfg, a.dtype)
    tx = optim.make_optimizer(optim_cfg(), 1000, params)
    step = jax.jit(make_train_step(lm_loss.make_loss_fn(mdef, chunk=a.chunk, drop_path=False, grad_accum=1), tx,
                                   schedule=optim.make_schedule(optim_cfg(), 1000)), donate_argnums=(0,))
    box = {"state": init_train_state(jax.tree.map(jnp.asarray, params), tx), "i": 0}
    jb = jax.tree.map(jnp.asarray, batch)

    def jax_step():
        box["i"] += 1
        box["state"], m = step(box["state"], jb, jax.random.key(box["i"]))
        return float(m["loss"])  # blocks

    # ---- PyTorch: the real tiles only, NCHW
    opt = torch.optim.AdamW(tm.parameters(), lr=4e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    real = batch["image_flags"].reshape(-1) > 0
    pv = batch["pixel_values"].reshape(-1, *batch["pixel_values"].shape[2:])[real]
    t_pv = torch.tensor(pv.transpose(0, 3, 1, 2).copy())
    t_ids, t_mask = torch.tensor(batch["input_ids"]).long(), torch.tensor(batch["attention_mask"]).long()
    t_labels = torch.tensor(batch["labels"]).long()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "bfloat16")

    def torch_step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = tm(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pv, labels=t_labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    return cfg, tm, jax_step, torch_step, batch, step, box, jb


def bench_sft(a) -> common.Timing:
    import torch
    cfg, tm, jax_step, torch_step, batch, *_ = setup(a)
    tokens = int(batch["attention_mask"].sum())
    print(f"# sft bench: vit {cfg.vision_config.hidden_size}x{cfg.vision_config.num_hidden_layers} @"
          f"{cfg.vision_config.image_size}px, llm {cfg.llm_config.hidden_size}x{cfg.llm_config.num_hidden_layers} "
          f"vocab {cfg.llm_config.vocab_size}; batch {a.batch} x {a.seq} tokens ({tokens} real, tiles "
          f"{row_tiles(a.tiles, a.batch)}, jax ViT batch {int(np.prod(batch['image_flags'].shape))} tiles, "
          f"{int((batch['labels'] != -100).sum())} label tokens), {a.dtype}; jax "
          f"{jax.default_backend()}, torch threads {torch.get_num_threads()}, {common.load_average()}")
    t0 = time.perf_counter()
    first_jax = jax_step()  # compiles
    compile_s = time.perf_counter() - t0
    first_torch = torch_step()
    print(f"# first-step loss: jax {first_jax:.5f}  torch {first_torch:.5f} (same weights and batch)")
    t = common.interleaved("sft_tokens_per_s_jax_vs_torch", torch_step, jax_step, reps=a.reps)
    t.compile_s = compile_s  # the call above; interleaved's own first call was a steady-state one
    t.print()
    print(f"# sft tokens/s (min time): jax {tokens / min(t.jax_s):,.0f}  torch {tokens / min(t.baseline_s):,.0f}")
    return t


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
    print(f"# cache bytes/sample: upstream 2800 x {hidden} x 4 = {upstream / 1e6:.2f} MB, compact bf16 "
          f"{length} real tokens = {per / 1e6:.2f} MB")
    print(f"cache_bytes_upstream_vs_compact: {upstream / per:.2f}x")
    return upstream / per


# ------------------------------------------------------------------------------------------------- profiling

def _hlo_kinds(hlo_text: str) -> dict[str, str]:
    """instruction name → what it computes, from the optimised HLO: a fusion is named by the heaviest op kinds it
    contains (dot/convolution first, then exp/log, reduce, scatter/gather), e.g. 'fusion[dot]' or 'fusion[exp,reduce]';
    other instructions by their opcode, with the result shape."""
    import re
    comps: dict[str, list[str]] = {}
    cur = None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            cur = m[1]
            comps[cur] = []
        elif cur is not None and line.startswith(" ") and " = " in line:
            comps[cur].append(line.strip())
    inst = re.compile(r"^(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\(")
    keys = ("dot", "convolution", "exponential", "log", "reduce", "scatter", "gather", "sort",
            "dynamic-update-slice", "transpose", "reduce-window", "select-and-scatter")

    def ops_of(comp: str, depth: int = 0) -> set[str]:
        out = set()
        for line in comps.get(comp, []):
            m = inst.match(line)
            if not m:
                continue
            out.add(m[3])
            for c in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line):
                if depth < 4:
                    out |= ops_of(c, depth + 1)
        return out

    kinds = {}
    for lines in comps.values():
        for line in lines:
            m = inst.match(line)
            if not m:
                continue
            name, shape, op = m[1], m[2], m[3]
            if op == "fusion":
                called = re.search(r"calls=%?([\w.\-]+)", line)
                inner = ops_of(called[1]) if called else set()
                tag = ",".join(k for k in keys if k in inner) or "elementwise"
                kinds[name] = f"fusion[{tag}] {shape}"
            else:
                kinds[name] = f"{op} {shape}"
    return kinds


def _perfetto_events(log_dir: str) -> list[dict]:
    import glob
    import gzip
    import json
    files = sorted(glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"{log_dir}: no *.trace.json.gz written by jax.profiler")
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    return [e for e in (data["traceEvents"] if isinstance(data, dict) else data) if e.get("ph") == "X"]


def _self_times(events: list[dict]) -> list[tuple[str, float]]:
    """(name, exclusive seconds) per event: a `while` thunk's event spans its body's thunks on the same thread,
    so each event's time minus that of the events nested in it."""
    out = []
    by_thread: dict = {}
    for e in events:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, name, child time, dur]
        for e in evs:
            while stack and e["ts"] >= stack[-1][0]:
                end, name, child, dur = stack.pop()
                out.append((name, (dur - child) * 1e-6))
            if stack:
                stack[-1][2] += e["dur"]
            stack.append([e["ts"] + e["dur"], e["name"], 0.0, e["dur"]])
        out += [(name, (dur - child) * 1e-6) for _, name, child, dur in stack]
    return out


def thunk_rows(log_dir: str, kinds: dict[str, str], fn, steps: int) -> list[tuple[str, float, float, str]]:
    """Trace `steps` calls of `fn` into `log_dir` and return (thunk, self seconds a call, calls a call, kind) for
    every XLA CPU thunk of the program `kinds` describes (`_hlo_kinds`), slowest first."""
    jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
    for _ in range(steps):
        fn()
    jax.profiler.stop_trace()
    agg: dict[str, list[float]] = {}
    for name, self_s in _self_times([e for e in _perfetto_events(log_dir) if e["name"] in kinds]):
        agg.setdefault(name, [0.0, 0])
        agg[name][0] += self_s / steps
        agg[name][1] += 1 / steps
    return sorted(((k, v[0], v[1], kinds[k]) for k, v in agg.items()), key=lambda r: -r[1])


def _table(rows: list[tuple[str, float, int]], total: float, top: int, title: str) -> None:
    print(f"# {title}: {total * 1e3:.1f} ms a step")
    print("# | op | kind | ms/step | share | calls/step |")
    for name, dur, calls, kind in rows[:top]:
        print(f"# | {name[:48]} | {kind[:70]} | {dur * 1e3:.1f} | {100 * dur / total:.1f}% | {calls:g} |")


def _categories(rows, total, title: str) -> None:
    cats: dict[str, float] = {}
    for _, dur, _, kind in rows:
        k = kind.lower()
        c = ("matmul" if any(x in k for x in ("dot", "convolution", "mm", "linear", "matmul", "addmm", "bmm",
                                                "conv"))
             else "attention" if "attention" in k or "sdpa" in k
             else "softmax/exp/log" if any(x in k for x in ("exp", "log", "softmax", "cross_entropy", "nll"))
             else "reduce" if "reduce" in k or "sum" in k or "norm" in k or "max" in k
             else "gather/scatter" if any(x in k for x in ("gather", "scatter", "index", "embedding"))
             else "copy/transpose" if any(x in k for x in ("copy", "transpose", "clone", "contiguous", "cat",
                                                           "dynamic-update-slice", "slice"))
             else "elementwise/other")
        cats[c] = cats.get(c, 0.0) + dur
    print(f"# {title} by kind: " + ", ".join(f"{c} {100 * v / total:.0f}% ({v * 1e3:.0f} ms)"
                                             for c, v in sorted(cats.items(), key=lambda kv: -kv[1])))


def profile_sft(a, top: int = 25) -> None:
    """Per-op time of one SFT step on each side (shares within one process: meaningful even on a loaded machine)."""
    import torch
    cfg, tm, jax_step, torch_step, batch, step, box, jb = setup(a)
    n = a.profile_steps
    if a.profile_side != "jax":
        _profile_torch(torch_step, n, top)
    if a.profile_side == "torch":
        return
    compiled = step.lower(box["state"], jb, jax.random.key(0)).compile()
    hlo = compiled.as_text()
    kinds = _hlo_kinds(hlo)

    def jax_step():
        box["state"], m = compiled(box["state"], jb, jax.random.key(1))
        return float(m["loss"])

    jax_step()  # warm-up
    with open(os.path.join(a.profile, "sft_step.hlo.txt"), "w") as f:
        f.write(hlo)
    rows = thunk_rows(a.profile, kinds, jax_step, n)
    jtotal = sum(r[1] for r in rows)
    _table(rows, jtotal, top, f"JAX SFT step, XLA CPU thunks ({len(rows)} ops seen)")
    _categories(rows, jtotal, "JAX")


def _profile_torch(torch_step, n: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile
    torch_step()  # warm-up (the first step also creates the AdamW state)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(n):
            torch_step()
    ka = prof.key_averages(group_by_input_shape=True)
    trows = sorted(((e.key, e.self_cpu_time_total * 1e-6 / n, e.count / n, f"{e.key} {e.input_shapes}")
                    for e in ka), key=lambda r: -r[1])
    ttotal = sum(r[1] for r in trows)
    _table(trows, ttotal, top, "torch SFT step, aten ops (self time)")
    _categories(trows, ttotal, "torch")


def ab_xla_options(a) -> common.Timing:
    """Interleaved A/B of the JAX SFT step compiled without (A) and with (B) `a.ab`'s XLA options; prints whether
    one step from the same state gives bitwise-equal loss and parameters."""
    cfg = bench_config(a)  # random init, no torch model: two JAX states are what memory holds
    jb = jax.tree.map(jnp.asarray, make_batch(cfg, a.batch, a.seq, a.tiles))
    step, state = _jax_step(a, cfg)
    opts = dict(kv.split("=", 1) for kv in a.ab.split(",") if kv)
    rng = jax.random.key(7)
    lowered = step.lower(state, jb, rng)
    comp_a = lowered.compile()
    comp_b = lowered.compile(compiler_options=opts)
    sa, ma = comp_a(jax.tree.map(jnp.copy, state), jb, rng)  # each compiled step donates its state
    sb, mb = comp_b(state, jb, rng)
    same = all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves((sa.params, ma)),
                                                           jax.tree.leaves((sb.params, mb))))
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)))
    print(f"# ab {opts}: loss A {float(ma['loss']):.7f} B {float(mb['loss']):.7f}; params and metrics after one "
          f"step bitwise equal: {same} (max |param diff| {diff:.2e})")
    boxes = {"a": sa, "b": sb}

    def run(which, comp):
        def f():
            boxes[which], m = comp(boxes[which], jb, rng)
            return float(m["loss"])
        return f

    t = common.interleaved("sft_xla_options_b_vs_a", run("a", comp_a), run("b", comp_b), reps=a.reps)
    t.print()
    _print_cpu(t, "A", "B")
    return t


def _print_cpu(t: common.Timing, a_name: str, b_name: str) -> None:
    ca, cb = min(t.baseline_cpu_s), min(t.jax_cpu_s)  # os.times(): 10 ms ticks
    print(f"# process CPU time min: {a_name} {ca * 1e3:.0f} ms, {b_name} {cb * 1e3:.0f} ms -> "
          + (f"{ca / cb:.2f}x" if cb > 0 else "n/a (under a clock tick)"))


def _jax_step(a, cfg):
    """(jitted SFT train step donating its state, a random-init train state): the JAX side of setup() alone."""
    mdef = vlm_ckpt.module_def(cfg, a.dtype)
    params = mdef.init(jax.random.key(0))
    tx = optim.make_optimizer(optim_cfg(), 1000, params)
    step = jax.jit(make_train_step(lm_loss.make_loss_fn(mdef, chunk=a.chunk, drop_path=False, grad_accum=1), tx,
                                   schedule=optim.make_schedule(optim_cfg(), 1000)), donate_argnums=(0,))
    return step, init_train_state(params, tx)


def ab_tile_layout(a) -> common.Timing:
    """Interleaved A/B of the JAX SFT step on the per-row padded tile layout (A) and the collator's flat layout
    (B): same weights (random init, no torch model), same tokens and real tiles; one compiled program a layout, one
    running state each. Prints the first step's loss and parameters on both (equal up to fp32 summation order),
    then wall and process CPU time (min over repeats: on a loaded machine read the CPU times)."""
    cfg = bench_config(a)
    batches = {k: jax.tree.map(jnp.asarray, make_batch(cfg, a.batch, a.seq, a.tiles, layout=k))
               for k in ("rows", "flat")}
    step, state = _jax_step(a, cfg)
    rng = jax.random.key(7)
    comp = {k: step.lower(state, b, rng).compile() for k, b in batches.items()}
    for k, b in batches.items():
        print(f"# layout {k}: pixel_values {tuple(b['pixel_values'].shape)}, ViT batch "
              f"{int(np.prod(b['image_flags'].shape))} tiles ({int(b['image_flags'].sum())} real)")
    sa, ma = comp["rows"](jax.tree.map(jnp.copy, state), batches["rows"], rng)
    sb, mb = comp["flat"](state, batches["flat"], rng)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)))
    print(f"# first step: loss rows {float(ma['loss']):.7f} flat {float(mb['loss']):.7f}; grad norm rows "
          f"{float(ma['grad_norm']):.7f} flat {float(mb['grad_norm']):.7f}; max |param diff| after it {diff:.2e}")
    boxes = {"rows": sa, "flat": sb}

    def run(k):
        def f():
            boxes[k], m = comp[k](boxes[k], batches[k], rng)
            return float(m["loss"])
        return f

    t = common.interleaved("sft_step_flat_tiles_vs_rows", run("rows"), run("flat"), reps=a.reps)
    t.print()
    _print_cpu(t, "rows", "flat")
    return t


def bench_ops(a) -> list[common.Timing]:
    """Each heavy op of the anchor SFT step alone, JAX (jitted) vs torch, interleaved: per-op speed without the
    memory of two whole models (GFLOP/s printed where the op is a product)."""
    import torch
    from recogdrive_jax.models.layers import dot_product_attention, token_logprobs
    g = np.random.default_rng(0)
    r, v = a.ops_rows, 151674

    def arr(*s):
        return g.standard_normal(s).astype(np.float32)

    def jce(logits, y):
        return jax.grad(lambda z: -jnp.sum(token_logprobs(z, y)))(logits)

    def tce(logits, y):
        logits = logits.detach().requires_grad_(True)
        torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
        return logits.grad

    def tsdpa(q, k, v_):
        return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v_)))

    x, w, gl, q = arr(r, 896), arr(896, v) * 0.02, arr(r, v), arr(1, 1025, 16, 64)
    mm = lambda p, q_: p @ q_  # noqa: E731
    cases = [("lm_head_fwd", mm, (x, w), mm, 2 * r * 896 * v),
             ("lm_head_grad_w", lambda p, q_: p.T @ q_, (x, gl), lambda p, q_: p.T @ q_, 2 * r * 896 * v),
             ("lm_head_grad_x", lambda p, q_: p @ q_.T, (gl, w), lambda p, q_: p @ q_.T, 2 * r * 896 * v),
             # the same product on a materialised [V, 896] copy of the kernel (the copy is timed too): the vocab
             # axis major in the right operand, as torch's [V, 896] weight has it
             ("lm_head_grad_x_wt_copy", lambda p, q_: p @ jax.lax.optimization_barrier(q_.T), (gl, w),
              lambda p, q_: p @ q_.T, 2 * r * 896 * v),
             ("vit_fc1", mm, (arr(1025, 1024), arr(1024, 4096)), mm, 2 * 1025 * 1024 * 4096),
             ("llm_gate_proj", mm, (arr(532, 896), arr(896, 4864)), mm, 2 * 532 * 896 * 4864),
             ("ce_fwd_bwd", jce, (gl, g.integers(0, v, r).astype(np.int32)), tce, None),
             ("vit_attention_fwd", lambda q_, k, v_: dot_product_attention(q_, k, v_), (q, q, q), tsdpa,
              4 * 16 * 1025 * 1025 * 64)]
    out = []
    only = {n for n in a.ops_only.split(",") if n}
    unknown = only - {c[0] for c in cases}
    if unknown:
        raise SystemExit(f"--ops-only: unknown case(s) {sorted(unknown)}; known: {[c[0] for c in cases]}")
    for name, jf, args, tf, flops in cases:
        if only and name not in only:
            continue
        jargs = [jnp.asarray(x_) for x_ in args]
        targs = [torch.from_numpy(x_).long() if x_.dtype == np.int32 else torch.from_numpy(x_) for x_ in args]
        comp = jax.jit(jf).lower(*jargs).compile()

        def torch_call(tf=tf, targs=targs, grad=name == "ce_fwd_bwd"):
            with torch.enable_grad() if grad else torch.no_grad():
                return tf(*targs)

        t = common.interleaved(f"op_{name}_jax_vs_torch", torch_call,
                               lambda comp=comp, jargs=jargs: jax.block_until_ready(comp(*jargs)), reps=a.reps)
        t.print()
        cb, cj = min(t.baseline_cpu_s), min(t.jax_cpu_s)  # process CPU time: what a loaded machine cannot skew
        print(f"# {name}: CPU time min torch {cb * 1e3:.1f} ms, jax {cj * 1e3:.1f} ms -> "
              + (f"{cb / cj:.2f}x" if cj > 0 else "n/a"))
        if flops:
            print(f"# {name}: torch {flops / min(t.baseline_s) / 1e9:.1f} GFLOP/s, jax "
                  f"{flops / min(t.jax_s) / 1e9:.1f} GFLOP/s (wall); by CPU time torch "
                  f"{flops / max(cb, 1e-9) / 1e9:.1f}, jax {flops / max(cj, 1e-9) / 1e9:.1f}")
        out.append(t)
    return out


def main(a) -> int:
    import torch
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.ops:
        bench_ops(a)
        return 0
    if a.ab:
        ab_xla_options(a)
        return 0
    if a.ab_layout:
        ab_tile_layout(a)
        return 0
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
        profile_sft(a)
        return 0
    if not a.skip_sft:
        t = bench_sft(a)
        if not a.quick:
            common.print_results_row([t], "python bench/sft.py")
    if not a.skip_cache:
        bench_cache_bytes()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(ARGS))
