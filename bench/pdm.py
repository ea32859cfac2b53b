"""PDM scorer µs/trajectory: JAX (`sim/pdm.py`, batched, jitted) vs the frozen shapely reference and vs the real NAVSIM
v1.1 scorer, on the same scenes and trajectories, interleaved in one process.

    python bench/pdm.py [--scenes 64] [--per_scene 16] [--ref_scenes 4] [--real_scenes 4] [--reps 5] [--threads 1]

Cases: `tests/pdm_cases.make_cases` (project scenes x candidate families: expert, noisy, reverse, colliding, ...).
Baselines, each scoring the first `--ref_scenes` / `--real_scenes` scenes' trajectories one at a time per request:
- `tests/pdm_reference.py`, the per-trajectory shapely reference scorer, kept frozen as a baseline (never optimised;
  per trajectory including its share of the once-per-scene reference-plan simulation), in this process;
- the real NAVSIM v1.1 `pdm_score` (PDMSimulator + PDMScorer, one call per trajectory as `run_pdm_score.py` does) on
  real `MetricCache` objects, in a long-lived subprocess in navsim-real's venv (../shared/tools/navsim-real): the
  scenes are exported (`sim/navsim_arrays.py`), packed into MetricCaches (their PDM-Closed reference given), pickled
  by NAVSIM's `MetricCache.dump`, listed by nuPlan's `save_cache_metadata` and loaded back by NAVSIM's
  `MetricCacheLoader`; the JAX side scores the scenes `python -m recogdrive_jax.convert navsim-metric-cache` made
  of that very cache. Only the `pdm_score` calls are timed there; their CPU counts as this benchmark's own.
Method (bench/common.py): ABAB repeats (>= 5 a side), min and median, JAX compile apart, others' CPU share;
single-threaded on both sides by default (the subprocess inherits OMP/MKL/OPENBLAS=1). JAX runs at batch
`--scenes` x `--per_scene` and at batch 1 (one scene, one trajectory). Prints (> 1 = JAX faster, min over repeats):
    pdm_jax_vs_reference: Nx / pdm_jax_vs_reference_b1: Nx
    pdm_jax_vs_navsim: Nx / pdm_jax_vs_navsim_b1: Nx      (when navsim-real is set up; goal: batched >= 100x)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from bench import common  # noqa: E402


def _parse(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=64, help="JAX batch: scenes")
    ap.add_argument("--per_scene", type=int, default=16, help="JAX batch: trajectories a scene")
    ap.add_argument("--ref_scenes", type=int, default=4, help="scenes the shapely reference scores a request")
    ap.add_argument("--real_scenes", type=int, default=4, help="scenes the real NAVSIM scorer scores a request")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repeats per side (>= 5)")
    ap.add_argument("--float64", action="store_true", help="JAX in float64 (NAVSIM's precision; default float32)")
    ap.add_argument("--no_navsim", action="store_true", help="only the reference rows")
    ap.add_argument("--no_b1", action="store_true", help="only the batched rows (no batch-1 rows)")
    ap.add_argument("--threads", type=int, default=1, help="1: single-threaded XLA and BLAS (recordable); 0: defaults")
    return ap.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads == 1:
    common.single_thread()  # before jax initialises (and inherited by the navsim-real subprocess)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import pdm_cases  # noqa: E402
import pdm_reference  # noqa: E402
from recogdrive_jax.sim import navsim_arrays, pdm, scene_store, world  # noqa: E402

from bench.navsim_real import Subprocess, tool  # noqa: E402

# Run by navsim-real's venv: argv = tool dir, cache dir, number of scenes timed, scene files (with `trajectories`).
# Builds and dumps the metric cache ("cached"), loads it back with NAVSIM's loader ("ready"), then per stdin line
# scores every trajectory of the timed scenes with the real pdm_score and answers "<mean s per call> <PDMS...>".
_REAL = r"""
import sys, time
from pathlib import Path
import numpy as np
tool, cache_dir, n_timed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, tool)
import navsim_real_pdm as nr
from nuplan.planning.training.experiments.cache_metadata_entry import CacheMetadataEntry, save_cache_metadata
from navsim.common.dataclasses import Trajectory
from navsim.common.dataloader import MetricCacheLoader
from navsim.evaluate.pdm_score import pdm_score

entries, plans = [], {}
for i, path in enumerate(sys.argv[4:]):
    scene, trajectories = nr.load_scene_npz(path)
    cache, _ = nr.build_metric_cache(scene)
    token = f"tok{i:04d}"
    cache.file_path = cache_dir / "log0" / "synthetic_scene" / token / "metric_cache.pkl"
    cache.file_path.parent.mkdir(parents=True, exist_ok=True)
    cache.dump()
    entries.append(CacheMetadataEntry(cache.file_path))
    plans[token] = [Trajectory(np.asarray(p, np.float64)) for p in trajectories]
save_cache_metadata(entries, cache_dir, 0)
print("cached", flush=True)
loader = MetricCacheLoader(cache_dir)
timed = [(loader.get_from_token(t), plans[t]) for t in sorted(loader.tokens)[:n_timed]]
simulator = nr.PDMSimulator(nr.PROPOSAL_SAMPLING)
scorer = nr.PDMScorer(nr.PROPOSAL_SAMPLING, nr.PDMScorerConfig())
print("ready", flush=True)
for _ in sys.stdin:
    times, scores = [], []
    for cache, trajs in timed:
        for traj in trajs:
            t = time.perf_counter()
            r = pdm_score(cache, traj, simulator.proposal_sampling, simulator, scorer)
            times.append(time.perf_counter() - t)
            scores.append(r.score)
    print(np.mean(times), *scores, flush=True)
"""


class RealScorer:
    """The real NAVSIM v1.1 scorer in a long-lived navsim-real subprocess on a real metric cache made of `scenes`;
    `__call__` scores the first `n_timed` scenes' trajectories once (blocking) and records the mean seconds per
    `pdm_score` call (setup and pipe time excluded) and the PDMS of every timed pair."""

    def __init__(self, scenes, trajs, n_timed: int, work: str):
        paths = []
        for i, sc in enumerate(scenes):
            paths.append(os.path.join(work, f"s{i:04d}.npz"))
            navsim_arrays.save(paths[-1], navsim_arrays.scene_to_arrays(sc, trajs[i]))
        self.cache_dir = os.path.join(work, "metric_cache")
        self.sub = Subprocess(_REAL, [self.cache_dir, str(n_timed)] + paths, pythonpath=[os.path.abspath(ROOT)])
        self.per_traj_s: list[float] = []
        self.pdms: np.ndarray | None = None
        self.sub.expect("cached")

    def convert(self, out: str) -> world.Scene:
        """The metric cache through `python -m recogdrive_jax.convert navsim-metric-cache` (NAVSIM's venv: the
        pickles hold navsim/nuplan classes) -> the batched scenes in the order they were exported."""
        r = subprocess.run([self.sub.python, "-m", "recogdrive_jax.convert", "navsim-metric-cache", self.cache_dir,
                            out], cwd=ROOT, env=self.sub.env, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(f"convert navsim-metric-cache {self.cache_dir} failed: {r.stderr.strip()[-2000:]}")
        tokens = list(scene_store.load_tokens(out))
        order = [tokens.index(f"tok{i:04d}") for i in range(len(tokens))]
        batch = scene_store.load_scenes(out)
        self.sub.expect("ready")
        return type(batch)(**{k: np.asarray(v)[order] for k, v in vars(batch).items()})

    def __call__(self):
        fields = self.sub.ask()
        self.per_traj_s.append(fields[0])
        self.pdms = np.asarray(fields[1:])

    def close(self):
        self.sub.close()


def per_trajectory(t: common.Timing, baseline_s: list[float], jax_n: int) -> common.Timing:
    """`t` in seconds per trajectory on both sides (baseline: `baseline_s`; JAX: call time / `jax_n`), keeping each
    side's measured CPU/wall ratio."""
    cpu = t.cpu_per_wall()
    t.baseline_s, t.jax_s = list(baseline_s), [s / jax_n for s in t.jax_s]
    if cpu is not None:
        t.baseline_cpu_s = [cpu[0] * s for s in t.baseline_s]
        t.jax_cpu_s = [cpu[1] * s for s in t.jax_s]
    return t


def main(args) -> int:
    scenes, trajs, _ = pdm_cases.make_cases(args.scenes, args.per_scene, seed=0)
    trajs = np.asarray(trajs, np.float32)  # [S, G, 8, 3]: the values every side scores (the export stores float32)
    n_ref = min(args.ref_scenes, args.scenes)
    print(f"backend: {jax.default_backend()}; JAX batch {args.scenes} scenes x {args.per_scene} trajectories "
          f"({'float64' if args.float64 else 'float32'}) and batch 1; threads {args.threads or 'default'}; "
          f"{common.load_average()} on {os.cpu_count()} CPUs")

    def jax_fn(batch, n):
        """JAX scoring the first n scenes (all their trajectories) or, n = 1, one scene's first trajectory."""
        b = type(batch)(**{k: np.asarray(v)[:n] for k, v in vars(batch).items()})
        tr = trajs[:n] if n > 1 else trajs[:1, :1]
        return lambda: jax.block_until_ready(pdm.pdm_score(b, tr, float64=args.float64)), int(np.prod(tr.shape[:2]))

    ref_trajs = trajs[:n_ref].astype(np.float64)

    def reference():
        for sc, tr in zip(scenes[:n_ref], ref_trajs):
            pdm_reference.score_many(sc, tr)

    batch = world.stack_scenes(scenes)
    timings = []
    sizes = (args.scenes,) if args.no_b1 else tuple(dict.fromkeys((args.scenes, 1)))
    for n in sizes:
        fn, count = jax_fn(batch, n)
        name = "pdm_jax_vs_reference" + ("_b1" if n == 1 else "")
        t = common.interleaved(name, reference, fn, reps=args.reps)
        t = per_trajectory(t, [s / (n_ref * args.per_scene) for s in t.baseline_s], count)
        print(f"# {name}: shapely reference {n_ref} scenes x {args.per_scene} trajectories a request; JAX batch "
              f"{count} trajectories; per trajectory:")
        t.print(unit="us", scale=1e6)
        timings.append(t)
    if args.no_navsim or not tool.tool_available():
        if not args.no_navsim:
            print("navsim: navsim-real not set up (see ../shared/tools/navsim-real/README.md); no pdm_jax_vs_navsim "
                  "row")
        common.print_results_row(timings, "python bench/pdm.py")
        return 0
    n_real = min(args.real_scenes, args.scenes)
    with tempfile.TemporaryDirectory() as work:
        real = RealScorer(scenes, trajs, n_real, work)
        try:
            converted = real.convert(os.path.join(work, "scenes.npz"))
            for n in sizes:
                fn, count = jax_fn(converted, n)
                name = "pdm_jax_vs_navsim" + ("_b1" if n == 1 else "")
                real.per_traj_s.clear()
                t = common.interleaved(name, real, fn, reps=args.reps, helper_pids=(real.sub.proc.pid,))
                t = per_trajectory(t, real.per_traj_s[-args.reps:], count)
                print(f"# {name}: real NAVSIM pdm_score on {n_real} scenes x {args.per_scene} trajectories a "
                      f"request (MetricCache from NAVSIM's loader); JAX batch {count} trajectories; per trajectory:")
                t.print(unit="us", scale=1e6)
                timings.append(t)
            # the same pairs on both sides: PDMS of the last request's timed pairs vs JAX on the converted cache
            mine = np.asarray(pdm.pdm_score(converted, trajs, float64=args.float64)["pdms"])[:n_real].ravel()
            d = np.abs(mine - real.pdms)
            print(f"# same pairs: JAX PDMS on the converted metric cache vs the real NAVSIM pdm_score on its "
                  f"{d.size} timed pairs: max |d| {d.max():.1e}, {int((d > 1e-4).sum())} pairs differ by > 1e-4")
        finally:
            real.close()
    common.print_results_row(timings, "python bench/pdm.py")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
