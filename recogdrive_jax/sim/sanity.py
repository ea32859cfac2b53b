"""Sanity of the synthetic world: expert vs constant-velocity PDMS on a generated split, plus BEV PNGs.

    python -m recogdrive_jax.sim.sanity --num_scenes 200 --out /tmp/sanity
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from recogdrive_jax.sim import baselines, pdm, render, scene_store, world


def run(num_scenes: int, out: str, seed: int = 0, num_bev: int = 8, chunk: int = 64,
        reference: str = world.DEFAULT_REFERENCE) -> dict:
    os.makedirs(out, exist_ok=True)
    scenes = world.generate_scenes(num_scenes, seed=seed, reference=reference)
    scene_store.save_scenes(os.path.join(out, "scenes.npz"), scenes)
    results = {"expert": [], "constant_velocity": []}
    subs = {"expert": [], "constant_velocity": []}
    for s in range(0, num_scenes, chunk):
        part = scenes[s:s + chunk]
        part = part + [part[-1]] * (chunk - len(part))  # fixed shape -> one compilation
        batch = world.stack_scenes(part)
        plans = np.stack([batch.expert, baselines.constant_velocity_plan(batch.status, batch.history)], 1)
        o = {k: np.asarray(v) for k, v in pdm.pdm_score(batch, plans).items()}
        n = min(chunk, num_scenes - s)
        for g, name in enumerate(results):
            results[name].append(o["pdms"][:n, g])
            subs[name].append({k: o[k][:n, g] for k in ("nc", "dac", "ttc", "ep", "c", "epdms")})
    summary = {}
    for name in results:
        summary[name] = {"pdms": float(np.concatenate(results[name]).mean())}
        for k in ("nc", "dac", "ttc", "ep", "c", "epdms"):
            summary[name][k] = float(np.concatenate([d[k] for d in subs[name]]).mean())
    for i, sc in enumerate(scenes[:num_bev]):
        render.render_bev(sc, {"const_vel": baselines.constant_velocity_plan(sc.status)},
                          path=os.path.join(out, f"bev_{i:03d}.png"))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_scenes", type=int, default=200)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num_bev", type=int, default=8)
    ap.add_argument("--reference", default=world.DEFAULT_REFERENCE, choices=world.REFERENCES,
                    help="EP's reference in ref_poses: the synthetic expert or PDM-Closed (NAVSIM's)")
    args = ap.parse_args(argv)
    summary = run(args.num_scenes, args.out, args.seed, args.num_bev, reference=args.reference)
    for name, m in summary.items():
        print(f"{name}: PDMS {m['pdms']:.4f}  (NC {m['nc']:.3f} DAC {m['dac']:.3f} TTC {m['ttc']:.3f} "
              f"EP {m['ep']:.3f} C {m['c']:.3f}; EPDMS {m['epdms']:.4f})")
    print(f"expert_pdms: {summary['expert']['pdms']:.4f}")
    print(f"constant_velocity_pdms: {summary['constant_velocity']['pdms']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
