"""Diffusion planner: JAX vs the PyTorch planner, same weights, batch and precision, interleaved in one process.

    python bench/planner.py                      # anchor shapes: DiT small, batch 16, vl_len 256 and 2800
    python bench/planner.py --vl-lens 256 --reps 5 --threads 1
    python bench/planner.py --vl-lens 256 --profile /tmp/planner_prof    # FLOP audit + per-op profile, no timing
    python bench/planner.py --vl-lens 256 --ab-config block.fold_cross=false   # A/B a config / DiT block switch
    python bench/planner.py --vl-lens 256 --ab xla_cpu_experimental_ynn_fusion_type=   # A/B XLA compile options

Baseline: `tests/torch_ref/planner.py`, proven equal to the upstream ReCogDrive planner (its own Lightning checkpoint,
IL forward, DDIM, chain log-probs to 1e-5) by tests/test_torch_ref_vs_upstream.py. Method: bench/common.py
(ABAB repeats, min/median, compile apart, others' CPU share; single-threaded both sides by default).
Prints (> 1 = JAX faster, min over repeats):
    planner_train_step_L256: 1.80x          IL train step (eps loss, AdamW, grad clip 1.0), batch 16
    planner_train_step_L2800: ...x          upstream's real VLM input length (~2,800 tokens)
    planner_ddim5_b1: ...x / planner_ddim5_b64: ...x   5-step DDIM `get_action` latency (vl_len 256)

`--profile DIR` (at the first of `--vl-lens`): (1) FLOP audit — every dot of the compiled JAX train step's optimised
HLO (written to DIR/planner_step.hlo.txt) times its while-loop trip count, grouped by part of the planner (VL
projection, the cross blocks' K/V projections of the memory, cross-attention products, the rest) and by forward /
backward, next to torch's FLOPs for the same step (torch.profiler's per-op FLOPs, classified by the same rule, and
FlopCounterMode's total); (2) per-op time of one step on each side (XLA CPU thunks from a jax.profiler trace;
torch.profiler aten ops), with GFLOP/s per op and shares by kind. Shares are meaningful on a loaded machine,
absolute times are not; (3) both whole steps and their GEMM floors (every product replayed alone) in process CPU
time, which a loaded machine does not inflate the way it does wall time. `--ab` / `--ab-config` print a bitwise or
tolerance check and a CPU-time A/B (bench/RESULTS.md, planner train step profile findings).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench import common  # noqa: E402


def _parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="small")
    p.add_argument("--vlm-size", default="large", choices=["large", "small"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vl-lens", default="256,2800", help="comma list of VLM token counts (anchors: 256, 2800)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repeats per side (>= 5)")
    p.add_argument("--dtype", default="float32", help="JAX compute dtype (torch runs fp32)")
    p.add_argument("--no-ddim", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="1 = single-threaded XLA and torch (recordable); 0 = defaults")
    p.add_argument("--profile", metavar="DIR", help="instead of timing: FLOP audit of the compiled JAX train step "
                                                    "vs torch and per-op profile of both (first of --vl-lens)")
    p.add_argument("--profile-side", choices=("both", "jax", "torch"), default="both")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--ab-config", metavar="K=V,...", help="instead of timing: A/B of the JAX step with these planner "
                                                          "config overrides (same weights; first of --vl-lens)")
    p.add_argument("--ab", metavar="K=V,...", help="instead of timing: A/B of the JAX step compiled with these XLA "
                                                   "options (bitwise check + CPU-time A/B, first of --vl-lens)")
    return p.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads == 1:
    common.single_thread()  # before jax and torch initialise
if ARGS is not None and ARGS.profile:  # one trace event per XLA CPU thunk (fusion, dot, ...)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from recogdrive_jax.convert.planner import torch_state_dict_to_params  # noqa: E402
from recogdrive_jax.models.planner import (build_planner, load_planner_params, planner_config,  # noqa: E402
                                           planner_params)
from torch_ref.planner import TorchPlanner, lightning_state_dict, normalize  # noqa: E402


def build(args):
    """(cfg, torch planner, JAX planner with the same weights, nnx optimizer, torch optimizer)."""
    cfg = planner_config(args.config, vlm_size=args.vlm_size, dtype=args.dtype)
    tm = TorchPlanner(vl_dim=cfg.vl_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                      output_dim=cfg.output_dim, mlp_hidden=cfg.mlp_hidden)
    jm = build_planner(cfg, nnx.Rngs(0))
    load_planner_params(jm, torch_state_dict_to_params(lightning_state_dict(tm), cfg, verbose=False))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4))
    opt = nnx.Optimizer(jm, tx, wrt=nnx.Param)
    topt = torch.optim.AdamW(tm.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4)
    return cfg, tm, jm, opt, topt


def make_inputs(cfg, b: int, n: int, seed: int = 0):
    """(vl_states [b, n, Hv], status [b, 8], history [b, 4, 3], future [b, 8, 3]) as numpy fp32."""
    g = np.random.default_rng(seed)
    return (g.normal(size=(b, n, cfg.vl_dim)).astype(np.float32),
            g.normal(size=(b, 8)).astype(np.float32), g.normal(size=(b, 4, 3)).astype(np.float32),
            (g.normal(size=(b, 8, 3)) * [10, 2, 0.2] + [15, 0, 0]).astype(np.float32))


@nnx.jit
def jax_step(m, opt, batch, rng):
    loss, grads = nnx.value_and_grad(lambda m: m.loss(batch, rng)[0])(m)
    opt.update(m, grads)
    return loss


def train_steps(args, cfg, tm, jm, opt, topt, n: int):
    """(torch_step, jax_step_fn, jax batch, torch tensors) of the IL train step at vl_len n: the same batch both sides
    (torch draws its own t and noise; the cost does not depend on them)."""
    vl, st, his, fut = make_inputs(cfg, args.batch, n)
    batch = {"cond": {"vl_states": jnp.asarray(vl), "status": jnp.asarray(st), "history": jnp.asarray(his)},
             "future": jnp.asarray(fut)}
    tvl, tst, this, tfut = (torch.from_numpy(a) for a in (vl, st, his, fut))

    def torch_step():
        ctx = tm.encode(tvl, this, tst)
        x0 = normalize(tfut)
        loss = tm.loss(x0, torch.randint(0, 100, (args.batch,)), torch.randn_like(x0), ctx)
        topt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        topt.step()
        return loss

    keys = iter(jax.random.split(jax.random.key(1), 100_000))
    return torch_step, (lambda: jax_step(jm, opt, batch, next(keys)).block_until_ready()), batch


def main(args) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg, tm, jm, opt, topt = build(args)
    print(f"# planner bench: {args.config} (D={cfg.embed_dim}, layers={cfg.num_layers}, Hv={cfg.vl_dim}), "
          f"batch {args.batch}, vl_len {args.vl_lens}, {jax.devices()[0].platform}, torch threads "
          f"{torch.get_num_threads()}, {common.load_average()}")
    if args.ab_config:
        ab_config(args, cfg, jm, int(args.vl_lens.split(",")[0]))
        return 0
    if args.ab:
        ab_xla_options(args, cfg, jm, opt, int(args.vl_lens.split(",")[0]))
        return 0
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        profile(args, cfg, tm, jm, opt, topt, int(args.vl_lens.split(",")[0]))
        return 0
    keys = iter(jax.random.split(jax.random.key(2), 100_000))
    timings = []
    for n in (int(x) for x in args.vl_lens.split(",") if x):
        torch_step, jax_fn, _ = train_steps(args, cfg, tm, jm, opt, topt, n)
        t = common.interleaved(f"planner_train_step_L{n}", torch_step, jax_fn, reps=args.reps)
        t.print()
        timings.append(t)

    if not args.no_ddim:
        n = int(args.vl_lens.split(",")[0])
        sample = nnx.jit(lambda m, c, r: m.sample(c, r, deterministic=False))
        for b in (1, 64):
            vl_b, st_b, his_b, _ = make_inputs(cfg, b, n, seed=b)
            cond = {"vl_states": jnp.asarray(vl_b), "status": jnp.asarray(st_b), "history": jnp.asarray(his_b)}
            tvl_b, tst_b, this_b = (torch.from_numpy(a) for a in (vl_b, st_b, his_b))

            def torch_sample():
                with torch.no_grad():
                    ctx = tm.encode(tvl_b, this_b, tst_b)
                    tm.sample_chain(ctx, torch.randn(b, 8, 3), torch.randn(5, b, 8, 3), min_std=1e-4, noise_clip=1.0)

            t = common.interleaved(f"planner_ddim5_b{b}", torch_sample,
                                   lambda: sample(jm, cond, next(keys)).block_until_ready(), reps=args.reps)
            t.print()
            timings.append(t)
    row = common.results_line(timings, "python bench/planner.py", "DATE", f"{jax.devices()[0].platform}")
    if row:
        print("# RESULTS.md row:\n" + row)
    return 0


# ------------------------------------------------------------------------------------------------- profiling

_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def _dims(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


def _int_set(line: str, key: str) -> tuple[int, ...]:
    m = re.search(key + r"=\{([\d,]*)\}", line)
    return _dims(m[1]) if m else ()


def hlo_dots(hlo_text: str) -> list[dict]:
    """Every dot of an optimised HLO module with its FLOPs (2 x output elements x contracted size), how many times
    one execution of the module runs it (product of the known trip counts of the while loops around it), the thunk
    (top-level or loop-body instruction) it belongs to, and whether it is in the backward pass (op_name holds
    `transpose(`). Convolutions are listed with flops None (the planner has none)."""
    comps: dict[str, list[str]] = {}
    entry, cur = None, None
    for line in hlo_text.splitlines():
        m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            cur = m[2]
            comps[cur] = []
            entry = cur if m[1] else entry
        elif cur is not None and line.startswith(" ") and " = " in line:
            comps[cur].append(line.strip())
    inst = re.compile(r"^(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
    known = {c: {m[1]: _dims(s[1]) for m in map(inst.match, lines) if m and (s := _SHAPE.search(m[2]))}
             for c, lines in comps.items()}  # instruction name -> result dims, per computation
    dots: list[dict] = []

    def walk(comp: str, mult: int, thunk: str | None, depth: int = 0) -> None:
        for line in comps.get(comp, []):
            m = inst.match(line)
            if not m:
                continue
            name, shape, op, rest = m[1], m[2], m[3], m[4]
            here = thunk or name  # instructions of the entry / of a loop body are thunks; fused ones belong to theirs
            if op in ("dot", "convolution"):
                args = rest.split("),", 1)[0]
                shapes = [_dims(s) for s in _SHAPE.findall(args)]
                if len(shapes) < 2:  # operand shapes not printed inline: look the operands up by name
                    shapes = [known[comp].get(a, ()) for a in re.findall(r"%?([\w.\-]+)", args)[:2]]
                out = _dims(_SHAPE.search(shape)[1])
                flops = None
                if op == "dot" and len(shapes) >= 2:
                    k = int(np.prod([shapes[0][i] for i in _int_set(line, "lhs_contracting_dims")] or [1]))
                    flops = 2 * int(np.prod(out or (1,))) * k
                op_name = re.search(r'op_name="([^"]*)"', line)
                dots.append(dict(name=name, thunk=here, op=op, lhs=shapes[0] if shapes else (),
                                 rhs=shapes[1] if len(shapes) > 1 else (), out=out, flops=flops, mult=mult,
                                 backward="transpose(" in (op_name[1] if op_name else ""),
                                 dims=tuple(_int_set(line, k) for k in ("lhs_contracting_dims",
                                                                        "rhs_contracting_dims", "lhs_batch_dims",
                                                                        "rhs_batch_dims"))))
            if depth > 8:
                continue
            trip = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
            for key, callee in re.findall(r"(calls|to_apply|body|condition)=%?([\w.\-]+)", line):
                if key == "to_apply":
                    continue  # reducers, no products
                loop = op == "while"
                walk(callee, mult * (int(trip[1]) if (loop and key == "body" and trip) else 1),
                     (None if loop else here) if thunk is None else thunk, depth + 1)
            for branches in re.findall(r"branch_computations=\{([^}]*)\}", line):
                for callee in re.findall(r"%?([\w.\-]+)", branches):
                    walk(callee, mult, here, depth + 1)

    walk(entry, 1, None)
    return dots


def planner_part(shapes, cfg, b: int, n: int, flops: float | None = None) -> str:
    """Which part of the planner a product with these operand shapes (and FLOPs, one call) belongs to; the same rule
    for both sides. A product on the memory is a K/V projection when it costs what one [B*L, D] x [D, D] product does
    (forward, weight or input gradient), else an attention product (q.k, p.v; with the folded cross-attention p.m)."""
    dims = [d for s in shapes for d in s]
    if cfg.vl_dim in dims:
        return "VL projection (feature_encoder)"
    on_memory = b * n in dims or any(n in s and len(s) >= 3 for s in shapes)
    d = cfg.embed_dim
    projection = (d in dims or 2 * d in dims) if flops is None else round(flops) % (2 * b * n * d * d) == 0
    if on_memory and not projection:
        return "cross-attention products (q.k, p.v, p.m)"
    if on_memory:
        return "memory K/V projections (8 cross blocks)"
    return "rest (DiT tokens: self-attn, q/out, SwiGLU, adaLN; encoders, decoder)"


def _torch_flop_rows(tm, torch_step, steps: int):
    """torch.profiler rows (op, input shapes, self s/step, calls/step, flops/step) and FlopCounterMode's total."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode
    torch_step()  # warm-up (the first step also creates the AdamW state)
    with FlopCounterMode(display=False) as fc:
        torch_step()
    total = fc.get_total_flops()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        for _ in range(steps):
            torch_step()
    rows = [(e.key, e.input_shapes, e.self_cpu_time_total * 1e-6 / steps, e.count / steps, (e.flops or 0) / steps)
            for e in prof.key_averages(group_by_input_shape=True)]
    return sorted(rows, key=lambda r: -r[2]), total


def _flop_table(title: str, by: dict) -> None:
    tot = sum(v for v in by.values())
    print(f"# {title}: {tot / 1e9:.1f} GFLOP a step")
    for k, v in sorted(by.items(), key=lambda kv: -kv[1]):
        print(f"#   {k}: {v / 1e9:.2f} GFLOP ({100 * v / max(tot, 1):.0f}%)")


def gemm_floor(dots: list[dict], trows, cfg, b: int, n: int, reps: int = 3) -> tuple[float, float]:
    """Each side's matrix products replayed alone (random operands, same shapes and dimension order; JAX: every dot
    of the compiled step, one jitted `dot_general` per distinct signature; torch: every mm/addmm/bmm the profiler
    saw, contiguous operands) times how often the step runs it: the step's GEMM time without anything around it.
    Prints both by part; returns (torch, jax) seconds."""
    g = np.random.default_rng(0)
    rand = lambda s: g.standard_normal(s).astype(np.float32)  # noqa: E731
    sigs: dict[tuple, list] = {}
    for d in dots:
        if d["flops"]:
            part = planner_part([d["lhs"], d["rhs"]], cfg, b, n, d["flops"])
            sigs.setdefault((d["lhs"], d["rhs"], d["dims"]), [0, d["flops"], part])[0] += d["mult"]
    jparts: dict[str, float] = {}
    for (lhs, rhs, (lc, rc, lb, rb)), (count, fl, part) in sigs.items():
        x, y = jnp.asarray(rand(lhs)), jnp.asarray(rand(rhs))
        f = jax.jit(lambda x, y, dn=((lc, rc), (lb, rb)): jax.lax.dot_general(x, y, dn)).lower(x, y).compile()
        jparts[part] = jparts.get(part, 0.0) + count * common.cpu_min(lambda: f(x, y).block_until_ready(), reps)
    tparts: dict[str, float] = {}
    for key, shapes, _, calls, fl in trows:
        shapes = [tuple(s) for s in shapes]
        if not fl or key not in ("aten::mm", "aten::addmm", "aten::bmm"):
            continue
        ts = [torch.from_numpy(rand(s)) for s in shapes if s]
        op = {"aten::mm": torch.mm, "aten::bmm": torch.bmm, "aten::addmm": torch.addmm}[key]
        part = planner_part([s for s in shapes if s], cfg, b, n, fl / calls)
        tparts[part] = tparts.get(part, 0.0) + calls * common.cpu_min(lambda: op(*ts[:3]), reps)
    tt, jt = sum(tparts.values()), sum(jparts.values())
    print(f"# GEMM floor (each product replayed alone, CPU ms a step): torch {tt * 1e3:.0f}, JAX {jt * 1e3:.0f} "
          f"({len(sigs)} distinct JAX dots)")
    for part in sorted(set(tparts) | set(jparts), key=lambda k: -jparts.get(k, 0.0)):
        tp, jp = tparts.get(part, 0.0), jparts.get(part, 0.0)
        print(f"#   {part}: torch {tp * 1e3:.0f} ms, JAX {jp * 1e3:.0f} ms"
              + (f" ({tp / jp:.2f}x)" if tp and jp else ""))
    return tt, jt


def compiled_step(jm, opt, batch, options: dict | None = None):
    """(compiled step, state): `jax_step` as a pure `(state, batch, rng) -> (state, loss)` (state donated), compiled
    with XLA `options`; state = a copy of the (model, optimizer) state it takes."""
    graphdef, state = nnx.split((jm, opt))

    def pure_step(state, batch, rng):
        m, o = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: m.loss(batch, rng)[0])(m)
        o.update(m, grads)
        return nnx.state((m, o)), loss

    lowered = jax.jit(pure_step, donate_argnums=0).lower(state, batch, jax.random.key(0))
    return lowered.compile(compiler_options=options or None), jax.tree.map(jnp.copy, state)


def ab_xla_options(args, cfg, jm, opt, n: int) -> None:
    """`--ab k=v,...`: the JAX train step compiled without (A) and with (B) these XLA options; whether one step from
    the same state gives bitwise-equal loss and state, then A/B interleaved by CPU time (load-robust, see common.cpu_min)."""
    import time
    opts = dict(kv.split("=", 1) for kv in args.ab.split(",") if kv)
    vl, st, his, fut = make_inputs(cfg, args.batch, n)
    batch = {"cond": {"vl_states": jnp.asarray(vl), "status": jnp.asarray(st), "history": jnp.asarray(his)},
             "future": jnp.asarray(fut)}
    (ca, sa), (cb, sb) = compiled_step(jm, opt, batch), compiled_step(jm, opt, batch, opts)
    rng = jax.random.key(3)
    (sa, la), (sb, lb) = ca(sa, batch, rng), cb(sb, batch, rng)
    same = all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves((sa, la)), jax.tree.leaves((sb, lb))))
    print(f"# ab {opts}: loss A {float(la):.8f} B {float(lb):.8f}; state after one step bitwise equal: {same}")
    box = {"a": sa, "b": sb}
    cpu = {"a": [], "b": []}
    for _ in range(args.reps):
        for k, c in (("a", ca), ("b", cb)):
            t = time.process_time()
            box[k], loss = c(box[k], batch, rng)
            float(loss)
            cpu[k].append(time.process_time() - t)
    a, b = min(cpu["a"]), min(cpu["b"])
    print(f"# planner step CPU time, min of {args.reps} interleaved: A {a * 1e3:.0f} ms, B {b * 1e3:.0f} ms "
          f"(medians {np.median(cpu['a']) * 1e3:.0f} / {np.median(cpu['b']) * 1e3:.0f})")
    print(f"planner_xla_options_b_vs_a: {a / b:.3f}x")


def ab_config(args, cfg, jm, n: int) -> None:
    """`--ab-config k=v,...`: the JAX train step of the planner (A) against the same planner with these config
    overrides (B: e.g. attention_impl, scan_layers, remat), same weights and batch: max |loss/grad difference| of
    one loss+gradient, then the two steps interleaved by CPU time."""
    import dataclasses
    import time
    from recogdrive_jax.models.planner import stack_blocks
    from recogdrive_jax.models.dit import set_fold_cross
    over, block_attrs = {}, {}
    for kv in (x for x in args.ab_config.split(",") if x):
        k, v = kv.split("=", 1)
        if k.startswith("block."):  # an attribute of every DiT block, e.g. block.fold_cross=false
            block_attrs[k[len("block."):]] = v.lower() in ("1", "true")
            continue
        cur = getattr(cfg, k)
        over[k] = (v.lower() in ("1", "true")) if isinstance(cur, bool) else type(cur)(v) if cur is not None else v
    cfg_b = dataclasses.replace(cfg, **over)
    jb = build_planner(cfg_b, nnx.Rngs(0))
    for k, v in block_attrs.items():
        if k != "fold_cross":
            raise SystemExit(f"--ab-config: unknown DiT block switch block.{k} (known: block.fold_cross)")
        set_fold_cross(jb, v)
    over.update({f"block.{k}": v for k, v in block_attrs.items()})
    params = planner_params(jm)
    load_planner_params(jb, stack_blocks(params) if cfg_b.scan_layers else params)
    vl, st, his, fut = make_inputs(cfg, args.batch, n)
    batch = {"cond": {"vl_states": jnp.asarray(vl), "status": jnp.asarray(st), "history": jnp.asarray(his)},
             "future": jnp.asarray(fut)}
    rng = jax.random.key(3)
    grad = nnx.jit(lambda m: nnx.value_and_grad(lambda m: m.loss(batch, rng)[0])(m))
    (la, ga), (lb, gb) = grad(jm), grad(jb)
    ga, gb = nnx.to_pure_dict(ga), nnx.to_pure_dict(gb)
    if cfg_b.scan_layers:
        ga = stack_blocks(ga)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)))
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ga))
    print(f"# ab-config {over}: loss A {float(la):.8f} B {float(lb):.8f} (|diff| {abs(float(la) - float(lb)):.2e}); "
          f"max |grad diff| {diff:.2e} (max |grad| {scale:.2e}); bitwise equal: {diff == 0 and float(la) == float(lb)}")
    steps = {}
    for k, m in (("a", jm), ("b", jb)):
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-8,
                                                                      weight_decay=1e-4))
        steps[k] = compiled_step(m, nnx.Optimizer(m, tx, wrt=nnx.Param), batch)
    box = {k: v[1] for k, v in steps.items()}
    cpu = {"a": [], "b": []}
    for i in range(args.reps + 1):
        for k in ("a", "b"):
            t = time.process_time()
            box[k], loss = steps[k][0](box[k], batch, rng)
            float(loss)
            if i:  # the first call of each is a warm-up
                cpu[k].append(time.process_time() - t)
    a, b = min(cpu["a"]), min(cpu["b"])
    print(f"# planner step CPU time, min of {args.reps} interleaved: A {a * 1e3:.0f} ms, B {b * 1e3:.0f} ms "
          f"(medians {np.median(cpu['a']) * 1e3:.0f} / {np.median(cpu['b']) * 1e3:.0f})")
    print(f"planner_config_b_vs_a: {a / b:.3f}x")


def profile(args, cfg, tm, jm, opt, topt, n: int, top: int = 30) -> None:
    """FLOP audit of the compiled JAX step vs torch's, then per-op time on each side (see the module docstring)."""
    from bench.sft import _categories, _hlo_kinds, thunk_rows
    torch_step, jax_fn, batch = train_steps(args, cfg, tm, jm, opt, topt, n)
    steps, b = args.profile_steps, args.batch
    print(f"# profile at vl_len {n}, batch {b}; {steps} step(s) per side")
    if args.profile_side != "jax":
        trows, ttotal = _torch_flop_rows(tm, torch_step, steps)
        parts: dict[str, float] = {}
        for key, shapes, _, calls, fl in trows:
            if fl:
                part = planner_part([tuple(s) for s in shapes if s], cfg, b, n, fl / calls)
                parts[part] = parts.get(part, 0.0) + fl
        _flop_table("torch FLOPs by part (torch.profiler: mm/addmm/bmm)", parts)
        print(f"# torch FlopCounterMode total (incl. sdpa): {ttotal / 1e9:.1f} GFLOP")
        tsum = sum(r[2] for r in trows)
        print(f"# torch step, aten ops (self time): {tsum * 1e3:.1f} ms a step")
        print("# | op | input shapes | ms/step | share | calls | GFLOP/s |")
        for key, shapes, s, c, fl in trows[:top]:
            gfs = f"{fl / s / 1e9:.1f}" if fl and s else ""
            print(f"# | {key} | {str(shapes)[:80]} | {s * 1e3:.1f} | {100 * s / tsum:.1f}% | {c:g} | {gfs} |")
        _categories([(k, s, c, f"{k} {sh}") for k, sh, s, c, _ in trows], tsum, "torch")
    if args.profile_side == "torch":
        return
    compiled, state = compiled_step(jm, opt, batch)
    hlo = compiled.as_text()
    with open(os.path.join(args.profile, "planner_step.hlo.txt"), "w") as f:
        f.write(hlo)
    dots = hlo_dots(hlo)
    parts, fwd_bwd, thunk_flops = {}, {}, {}
    for d in dots:
        fl = (d["flops"] or 0) * d["mult"]
        part = planner_part([d["lhs"], d["rhs"]], cfg, b, n, d["flops"])
        parts[part] = parts.get(part, 0) + fl
        key = f"{part} [{'bwd' if d['backward'] else 'fwd'}]"
        fwd_bwd[key] = fwd_bwd.get(key, 0) + fl
        thunk_flops[d["thunk"]] = thunk_flops.get(d["thunk"], 0) + (d["flops"] or 0)
    _flop_table(f"JAX FLOPs by part ({len(dots)} dots in the compiled HLO x trip counts)", parts)
    _flop_table("JAX FLOPs by part and pass", fwd_bwd)
    sigs: dict[str, list] = {}
    for d in dots:
        sig = f"{list(d['lhs'])} x {list(d['rhs'])} -> {list(d['out'])}{' bwd' if d['backward'] else ''}"
        sigs.setdefault(sig, [0, 0])
        sigs[sig][0] += d["mult"]
        sigs[sig][1] += (d["flops"] or 0) * d["mult"]
    print("# JAX dots by shape | count | GFLOP")
    for sig, (cnt, fl) in sorted(sigs.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"#   {sig} | {cnt} | {fl / 1e9:.2f}")

    kinds = _hlo_kinds(hlo)
    box = {"state": state}

    def run():
        box["state"], loss = compiled(box["state"], batch, jax.random.key(1))
        return float(loss)

    run()  # warm-up
    if args.profile_side == "both":  # whole steps and their GEMM floors, by CPU time (see common.cpu_min)
        import time
        cpu = {"torch": [], "jax": []}
        for _ in range(args.reps):  # interleaved
            for side, fn in (("torch", torch_step), ("jax", run)):
                t = time.process_time()
                fn()
                cpu[side].append(time.process_time() - t)
        ts, js = min(cpu["torch"]), min(cpu["jax"])
        print(f"# step CPU time, min of {args.reps} interleaved: torch {ts * 1e3:.0f} ms, JAX {js * 1e3:.0f} ms "
              f"({ts / js:.2f}x; medians {np.median(cpu['torch']) * 1e3:.0f} / {np.median(cpu['jax']) * 1e3:.0f})")
        tf, jf = gemm_floor(dots, trows, cfg, b, n)
        print(f"# step minus GEMM floor (norms, attention, copies, optimizer, framework): torch "
              f"{(ts - tf) * 1e3:.0f} ms, JAX {(js - jf) * 1e3:.0f} ms")
    rows = thunk_rows(args.profile, kinds, run, steps)
    jsum = sum(r[1] for r in rows)
    print(f"# JAX step, XLA CPU thunks ({len(rows)} seen): {jsum * 1e3:.1f} ms a step")
    print("# | thunk | kind | ms/step | share | calls | GFLOP/s |")
    for name, s, c, kind in rows[:top]:
        fl = thunk_flops.get(name, 0) * c
        gfs = f"{fl / s / 1e9:.1f}" if fl and s else ""
        print(f"# | {name[:40]} | {kind[:80]} | {s * 1e3:.1f} | {100 * s / jsum:.1f}% | {c:g} | {gfs} |")
    _categories(rows, jsum, "JAX")
    jax.block_until_ready(box["state"])


if __name__ == "__main__":
    raise SystemExit(main(ARGS))
