"""PDM-Closed ms/scene: JAX (`sim/pdm_closed.py`, batched, jitted) vs the unmodified NAVSIM v1.1 planner.

    python bench/pdm_closed.py [--scenes 64] [--real_scenes 16]
The real planner runs in navsim-real's own venv (../shared/tools/navsim-real; it cannot share this process), one
scene at a time as upstream does, timed inside that process around the planner call only. JAX is timed at batch 1
and at batch `--scenes`, compile time (first call) printed separately. Prints `pdm_closed_jax_vs_navsim_b1: Nx`
and `..._b64: Nx` when the tool is set up.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from recogdrive_jax.sim import navsim_arrays, pdm_closed, world  # noqa: E402

_spec = importlib.util.spec_from_file_location("navsim_real_make", os.path.join(ROOT, "tests", "fixtures",
                                                                               "navsim_real", "make_fixture.py"))
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

_REAL = r"""
import sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
import navsim_real_pdm as real
from navsim.planning.metric_caching.metric_cache_processor import MetricCacheProcessor
times = []
for path in sys.argv[2:]:
    scene, _ = real.load_scene_npz(path)
    processor = MetricCacheProcessor(cache_path=None, force_feature_computation=False)
    ego = real.build_ego_state(scene["ego_state"])
    types = np.asarray(scene["agent_types"], np.int64)
    frames = real.build_detection_tracks(real._pad_agents(scene["agents"], types), types)
    drivable, route = real.build_drivable_map(scene)
    cl = real.centerline_states(scene["centerline"])
    t = time.perf_counter()
    real.run_pdm_closed(processor, ego, frames[0], drivable, route, cl, float(scene["speed_limit"]))
    times.append(time.perf_counter() - t)
print(np.mean(times))
"""


def time_jax(scenes, limits, repeats: int) -> tuple[float, float]:
    """(compile + first call s, ms per scene)."""
    batch = world.stack_scenes(scenes)
    t0 = time.perf_counter()
    pdm_closed.pdm_closed(batch, limits)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        pdm_closed.pdm_closed(batch, limits)
    return first, 1e3 * (time.perf_counter() - t0) / (repeats * len(scenes))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=64)
    ap.add_argument("--real_scenes", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    scenes = world.generate_scenes(args.scenes, seed=7, reference="expert")  # PDM-Closed is what is timed
    limits = np.random.default_rng(0).uniform(8.0, 15.0, args.scenes)
    c1, ms1 = time_jax(scenes[:1], limits[:1], args.repeats * 4)
    cb, msb = time_jax(scenes, limits, args.repeats)
    print(f"backend: {jax.default_backend()}")
    print(f"jax batch 1: {ms1:.1f} ms/scene (compile + first call {c1:.1f} s, excluded)")
    print(f"jax batch {args.scenes}: {msb:.2f} ms/scene (compile + first call {cb:.1f} s, excluded)")
    if not tool.tool_available():
        print("navsim: navsim-real not set up (see ../shared/tools/navsim-real/README.md); no ratio")
        return 0
    _, python, src = tool.tool_paths()
    tool_dir = tool.tool_paths()[0]
    with tempfile.TemporaryDirectory() as work:
        paths = []
        for i, sc in enumerate(scenes[: args.real_scenes]):
            paths.append(os.path.join(work, f"s{i}.npz"))
            navsim_arrays.save(paths[-1], navsim_arrays.scene_to_arrays(sc, with_reference=False,
                                                                         speed_limit=limits[i]))
        env = dict(os.environ, NAVSIM_REAL_SRC=src, PYTHONWARNINGS="ignore")
        r = subprocess.run([python, "-c", _REAL, tool_dir] + paths, env=env, capture_output=True, text=True,
                           check=True)
    real_ms = 1e3 * float(r.stdout.strip().splitlines()[-1])
    print(f"navsim (real PDM-Closed, {args.real_scenes} scenes): {real_ms:.1f} ms/scene")
    print(f"pdm_closed_jax_vs_navsim_b1: {real_ms / ms1:.1f}x")
    print(f"pdm_closed_jax_vs_navsim_b{args.scenes}: {real_ms / msb:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
