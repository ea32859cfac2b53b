"""PDM scorer throughput: vectorised JAX (`sim/pdm.py`) vs the per-trajectory shapely reference, same cases.

    python bench/pdm.py [--scenes 64] [--per_scene 16] [--ref_trajs 64]
Prints trajectories/s of both and `pdm_jax_vs_reference: <ratio>x`. Both score the same scenes and trajectories
(the reference a prefix of the JAX batch); JAX compile time is excluded from its rate and printed separately.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import pdm_cases  # noqa: E402
import pdm_reference  # noqa: E402
from recogdrive_jax.sim import pdm, world  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=64)
    ap.add_argument("--per_scene", type=int, default=16)
    ap.add_argument("--ref_trajs", type=int, default=64, help="trajectories scored by the reference")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    scenes, trajs, _ = pdm_cases.make_cases(args.scenes, args.per_scene, seed=0)
    batch = world.stack_scenes(scenes)
    n = trajs.shape[0] * trajs.shape[1]
    t0 = time.perf_counter()
    jax.block_until_ready(pdm.pdm_score(batch, trajs))  # compile (+ one run), reported separately
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        jax.block_until_ready(pdm.pdm_score(batch, trajs))
    jax_tps = n * args.repeats / (time.perf_counter() - t0)
    # Reference: per trajectory, including its share of the per-scene reference-plan simulation.
    per = max(1, args.ref_trajs // args.per_scene)
    t0 = time.perf_counter()
    done = 0
    for i in range(per):
        pdm_reference.score_many(scenes[i], trajs[i].astype(np.float64))
        done += trajs.shape[1]
    ref_tps = done / (time.perf_counter() - t0)
    print(f"backend: {jax.default_backend()}  batch: {trajs.shape[0]} scenes x {trajs.shape[1]} trajectories")
    print(f"jax: {jax_tps:.1f} trajectories/s (compile + first call {compile_s:.1f} s, excluded)")
    print(f"reference: {ref_tps:.1f} trajectories/s")
    print(f"pdm_jax_vs_reference: {jax_tps / ref_tps:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
