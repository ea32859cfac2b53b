"""PDM-Closed ms/scene: JAX (`sim/pdm_closed.py`, batched, jitted) vs the unmodified NAVSIM v1.1 planner.

    python bench/pdm_closed.py [--scenes 64] [--real_scenes 16] [--reps 5]
The real planner runs in navsim-real's own venv (../shared/tools/navsim-real; it cannot share this process): one
long-lived subprocess plans `--real_scenes` scenes one at a time as upstream does, timed around the planner call
only, each time this process asks (a line on its stdin). `bench/common.interleaved` alternates that baseline
with the JAX call (ABAB..., >= 5 repeats each, compile time apart), at batch 1 and at batch `--scenes`, and prints
the load average and the other processes' CPU share: on a loaded machine the ratios are marked as such.
Prints `pdm_closed_jax_vs_navsim_b1: Nx` and `..._b64: Nx` (per scene, min over repeats) when the tool is set up.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from bench import common  # noqa: E402



def _parse(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=64)
    ap.add_argument("--real_scenes", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, choices=(0, 1),
                    help="1: single-threaded XLA and BLAS (recordable); 0: defaults")
    return ap.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads == 1:
    common.single_thread()  # before jax initialises (and inherited by the navsim-real subprocess)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from recogdrive_jax.sim import navsim_arrays, pdm_closed, world  # noqa: E402

from bench.navsim_real import Subprocess, tool  # noqa: E402

_REAL = r"""
import sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
import navsim_real_pdm as real
from navsim.planning.metric_caching.metric_cache_processor import MetricCacheProcessor
inputs = []
for path in sys.argv[2:]:
    scene, _ = real.load_scene_npz(path)
    ego = real.build_ego_state(scene["ego_state"])
    types = np.asarray(scene["agent_types"], np.int64)
    frames = real.build_detection_tracks(real._pad_agents(scene["agents"], types), types)
    drivable, route = real.build_drivable_map(scene)
    inputs.append((ego, frames[0], drivable, route, real.centerline_states(scene["centerline"]),
                   float(scene["speed_limit"])))
print("ready", flush=True)
for line in sys.stdin:  # one request: plan every scene once, answer the mean planner seconds per scene
    times = []
    for ego, det, drivable, route, cl, limit in inputs:
        processor = MetricCacheProcessor(cache_path=None, force_feature_computation=False)
        t = time.perf_counter()
        real.run_pdm_closed(processor, ego, det, drivable, route, cl, limit)
        times.append(time.perf_counter() - t)
    print(np.mean(times), flush=True)
"""


class RealPlanner:
    """The real PDM-Closed in a long-lived navsim-real subprocess; `__call__` plans its scenes once (blocking) and
    records the planner's own mean seconds per scene (setup and pipe time excluded)."""

    def __init__(self, scenes, limits, work: str):
        paths = []
        for i, (sc, lim) in enumerate(zip(scenes, limits)):
            paths.append(os.path.join(work, f"s{i}.npz"))
            navsim_arrays.save(paths[-1], navsim_arrays.scene_to_arrays(sc, with_reference=False, speed_limit=lim))
        self.sub = Subprocess(_REAL, paths)
        self.sub.expect("ready")
        self.per_scene_s: list[float] = []

    def __call__(self):
        self.per_scene_s.append(self.sub.ask()[0])

    def close(self):
        self.sub.close()


def main(argv=None) -> int:
    args = ARGS if argv is None and ARGS is not None else _parse(argv)
    scenes = world.generate_scenes(args.scenes, seed=7, reference="expert")  # PDM-Closed is what is timed
    limits = np.random.default_rng(0).uniform(8.0, 15.0, args.scenes)
    print(f"backend: {jax.default_backend()}; {common.load_average()} on {os.cpu_count()} CPUs")

    def jax_fn(n):
        batch = world.stack_scenes(scenes[:n])
        return lambda: pdm_closed.pdm_closed(batch, limits[:n])  # returns numpy: blocks until done

    if not tool.tool_available():
        for n in (1, args.scenes):
            fn = jax_fn(n)
            t0 = time.perf_counter()
            fn()
            c = time.perf_counter() - t0
            print(f"jax batch {n}: {1e3 * common.time_call(fn, args.reps, 'min') / n:.2f} ms/scene "
                  f"(compile + first call {c:.1f} s, excluded)")
        print("navsim: navsim-real not set up (see ../shared/tools/navsim-real/README.md); no ratio")
        return 0
    with tempfile.TemporaryDirectory() as work:
        real = RealPlanner(scenes[: args.real_scenes], limits[: args.real_scenes], work)
        try:
            for n in (1, args.scenes):
                real.per_scene_s.clear()
                t = common.interleaved(f"pdm_closed_jax_vs_navsim_b{n}", real, jax_fn(n), reps=args.reps,
                                       helper_pids=(real.sub.proc.pid,))
                # per scene on both sides: the planner's own seconds per scene vs the JAX call / batch size
                t.baseline_s = list(real.per_scene_s[-args.reps:])
                t.jax_s = [s / n for s in t.jax_s]
                # CPU seconds per scene too, so cpu/wall stays "cores used" (a call scores n / real_scenes scenes)
                t.jax_cpu_s = [c / n for c in t.jax_cpu_s or []] or None
                t.baseline_cpu_s = [c / args.real_scenes for c in t.baseline_cpu_s or []] or None
                print(f"# batch {n}: real PDM-Closed {1e3 * min(t.baseline_s):.1f} ms/scene "
                      f"({args.real_scenes} scenes), JAX {1e3 * min(t.jax_s):.2f} ms/scene; {common.load_average()}")
                t.print()
        finally:
            real.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
